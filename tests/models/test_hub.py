"""An unreachable Hugging Face Hub is detected once, quickly, and said in one message (vlmsae.models.hub)."""

from __future__ import annotations

import socket

import pytest

from vlmsae.models import hub


@pytest.fixture
def no_network(monkeypatch):
    """A machine without network: every connection fails; HF_HUB_OFFLINE unset (and restored afterwards)."""
    from huggingface_hub import constants

    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(hub, "_switched", False)
    hub._probe.cache_clear()
    yield calls
    hub._probe.cache_clear()


def test_unreachable_hub_is_probed_once_with_a_short_timeout(no_network):
    assert "no connection to huggingface.co:443" in hub.hub_unreachable()
    assert hub.offline_reason() == hub.hub_unreachable()
    assert no_network == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)]  # one probe for the whole process
    assert hub.PROBE_TIMEOUT_S <= 5


def test_hf_hub_offline_needs_no_probe(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set" and no_network == []


def test_open_clip_weights_without_a_hub_fail_in_one_message(no_network, tmp_path):
    from vlmsae.models.open_clip_backend import _missing_weights_error, create_open_clip, resolve_open_clip_weights
    from vlmsae.models.spec import get_model_spec

    spec = get_model_spec("clip_b32")
    source = resolve_open_clip_weights(spec.name, spec.arch, spec.pretrained, None, spec.pretrained_tag, {})
    with pytest.raises(RuntimeError, match=r"(?s)Hugging Face Hub is unreachable .*model.local_path") as err:
        create_open_clip(source, str(tmp_path / "empty_cache"), on_missing=lambda e: _missing_weights_error(spec, e))
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chain of download tracebacks
    assert len(no_network) == 1
