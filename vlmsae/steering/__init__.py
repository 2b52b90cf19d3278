"""Steer LLaVA through SAE latents in its vision tower (METHOD §5): hooks, generation helpers, the steering score.

:mod:`~vlmsae.steering.setup` loads the LLaVA and the SAE, :mod:`~vlmsae.steering.compare` is the ``steer`` job's
side-by-side answers, :mod:`~vlmsae.steering.evaluate` the ``steer_eval`` job's score run.
"""

from vlmsae.steering.generate import ONE_WORD_PROMPT, chat_prompt, first_word, generate_answers, white_image
from vlmsae.steering.hooks import (
    MODES,
    SteeringHandle,
    alpha_sweep,
    edit_activations,
    grid_patches,
    sae_layer,
    steer,
    token_mask,
)

__all__ = [
    "MODES",
    "ONE_WORD_PROMPT",
    "SteeringHandle",
    "alpha_sweep",
    "chat_prompt",
    "edit_activations",
    "first_word",
    "generate_answers",
    "grid_patches",
    "sae_layer",
    "steer",
    "token_mask",
    "white_image",
]
