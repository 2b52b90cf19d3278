"""Asking LLaVA (vlmsae.steering.generate): the first word of an answer, as the steering score reads it."""

from __future__ import annotations

from vlmsae.steering import first_word


def test_first_word():
    assert first_word(" Dog.\nA dog") == "dog"
    assert first_word("**Sea-lion** swims") == "sea-lion"
    assert first_word("...") == ""
