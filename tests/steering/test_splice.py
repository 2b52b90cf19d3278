"""Splice fidelity inside the tiny LLaVA (vlmsae.steering.splice): the formulas on small tensors by hand, the
teacher forcing lines up with generation, an exact SAE and the error-preserving control lose nothing, a random
SAE loses something, bad prompt files are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmsae.models.llava import build_tiny_llava, load_llava
from vlmsae.sae import SAEConfig, build_sae
from vlmsae.steering import splice
from vlmsae.steering.setup import SteeringSetup

LAYER = 2  # tiny LLaVA: 4 vision blocks, vision_feature_layer=-2 -> block 2


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_llava(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava"), dtype="float32")


@pytest.fixture(scope="module")
def items(llava, identity_sae):
    model, processor = llava
    setup = SteeringSetup(model, processor, identity_sae(), LAYER, 32)
    items, note = splice.prompt_items(setup, None, None, 3, max_new_tokens=5, batch_size=2)
    assert len(items) == 3 and "clean model" in note and all(i.prompt == splice.DEFAULT_PROMPT for i in items)
    return items


def test_formulas_by_hand():
    logp_clean_NV = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    logp_other_NV = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    kl_N = splice.kl_per_token(logp_clean_NV, logp_other_NV)
    hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl_N, torch.tensor([hand, 0.0]), atol=1e-6, rtol=0)
    nll_N = splice.nll_per_token(logp_other_NV, torch.tensor([1, 0]))
    torch.testing.assert_close(nll_N, torch.tensor([-math.log(0.75), -math.log(0.9)]), atol=1e-6, rtol=0)
    assert splice.fraction_recovered(3.0, 2.0, 1.0) == pytest.approx(0.5)  # (3 - 2) / (3 - 1)
    assert splice.fraction_recovered(3.0, 1.0, 1.0) == pytest.approx(1.0)
    assert splice.fraction_recovered(3.0, 4.0, 1.0) == pytest.approx(-0.5)  # worse than ablating
    assert math.isnan(splice.fraction_recovered(2.0, 1.5, 2.0))  # the ablation loses nothing: 0 denominator


def test_teacher_forcing_lines_up_with_generation(llava, items):
    """The built-in answers are the clean model's greedy answers, so at every forced answer position the clean
    argmax is the answer token: the logits read are the ones that predict it."""
    model, processor = llava
    batch = splice.forced_batch(processor, items, torch.device("cpu"), torch.float32)
    logp_NV = splice.answer_logprobs(model, batch)
    assert logp_NV.shape[0] == batch.target_N.numel() > len(items)
    assert torch.equal(logp_NV.argmax(-1), batch.target_N)


def test_exact_sae_and_control_lose_nothing_random_sae_loses(llava, items, identity_sae):
    model, processor = llava
    exact = splice.evaluate_splice(SteeringSetup(model, processor, identity_sae(), LAYER, 32), items, batch_size=2)
    s = exact.summary()
    assert s["kl"] <= 1e-6 and s["kl_error_preserving"] <= 1e-6
    assert s["nll_zero"] > s["nll_clean"] and s["nll_mean"] > s["nll_clean"]  # the ablations do hurt
    for key in ("frac_recovered_zero", "frac_recovered_mean", "frac_recovered_zero_error_preserving"):
        assert s[key] == pytest.approx(1.0, abs=1e-4), key
    assert s["top1_agreement"] == 1.0 and s["n_answers"] == 3

    random_sae = build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0).eval()
    scores = splice.evaluate_splice(SteeringSetup(model, processor, random_sae, LAYER, 32), items, batch_size=3)
    r = scores.summary()
    assert r["kl"] > 1e-5 and r["nll_spliced"] > r["nll_clean"]
    assert r["frac_recovered_zero"] < 1.0 - 1e-3 and r["frac_recovered_mean"] < 1.0 - 1e-3
    # The control goes through the same hook yet keeps h: KL 0 and 100 % recovered, whatever the SAE.
    assert r["kl_error_preserving"] <= 1e-6
    assert r["frac_recovered_zero_error_preserving"] == pytest.approx(1.0, abs=1e-4)
    # Batching does not change the figures; the summary is the mean over the pooled tokens.
    assert r["nll_clean"] == pytest.approx(s["nll_clean"], abs=1e-5)
    assert r["nll_spliced"] == pytest.approx(float(scores.nll[splice.SPLICED].double().mean()))
    # The mean ablation uses the block's mean over every token of the images, computed here by hand.
    batch = splice.forced_batch(processor, items, torch.device("cpu"), torch.float32)
    seen = []
    from vlmsae.models.llava import vision_blocks

    h = vision_blocks(model)[LAYER].register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(**batch.inputs)
    h.remove()
    mean_D = splice.block_mean(model, LAYER, [batch.inputs["pixel_values"]])
    torch.testing.assert_close(mean_D, seen[0].mean(dim=(0, 1)), atol=1e-5, rtol=0)
    rows = {row["condition"]: row for row in scores.rows()}
    assert set(rows) == {"clean", *splice.CONDITIONS} and rows["clean"]["kl"] == 0.0
    assert rows[splice.SPLICED]["frac_recovered_mean"] == r["frac_recovered_mean"]
    assert [a["n_tokens"] for a in scores.per_answer()] == [int((scores.owner_N == i).sum()) for i in range(3)]


def test_nan_denominator_gets_a_note(llava, items, identity_sae):
    model, processor = llava
    scores = splice.evaluate_splice(SteeringSetup(model, processor, identity_sae(), LAYER, 32), items[:1], 1)
    scores.nll[splice.ZERO] = scores.nll["clean"].clone()  # an ablation that loses nothing
    assert math.isnan(scores.summary()["frac_recovered_zero"])
    assert any("NaN" in n and "zero-ablated" in n for n in scores.all_notes())
    result = scores.result({})
    assert result.to_dict()["summary"]["frac_recovered_zero"] is None  # strict JSON: null, not NaN


def test_prompt_files(tmp_path, llava, identity_sae):
    from PIL import Image

    model, processor = llava
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    good = tmp_path / "p.csv"
    good.write_text("image,prompt,answer\nred.png,what is shown?,a red image\nwhite,describe the image.,white\n")
    setup = SteeringSetup(model, processor, identity_sae(), LAYER, 32)
    items, note = splice.prompt_items(setup, str(good), None, None, 5, 2)
    assert [i.answer for i in items] == ["a red image", "white"] and "p.csv" in note
    assert items[0].image_name == str(tmp_path / "red.png")
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"image": "white", "prompt": "describe", "answer": "white"}]))
    assert splice.read_prompt_file(as_json) == [{"image": "white", "prompt": "describe", "answer": "white"}]

    no_answer = tmp_path / "noanswer.csv"
    no_answer.write_text("image,prompt\nred.png,what?\n")
    with pytest.raises(ValueError, match=r"noanswer\.csv.*row 1 has no answer.*prompts=null"):
        splice.read_prompt_file(no_answer)
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps([{"image": "white", "prompt": "describe", "answer": " "}]))
    with pytest.raises(ValueError, match="row 1 has an empty answer"):
        splice.read_prompt_file(blank)
    for empty, text in (("empty.csv", "image,prompt,answer\n"), ("empty.json", "[]"), ("nothing.csv", "")):
        (tmp_path / empty).write_text(text)
        with pytest.raises(ValueError, match=rf"{empty}.*holds no rows.*image,prompt,answer"):
            splice.read_prompt_file(tmp_path / empty)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        splice.read_prompt_file(tmp_path / "missing.csv")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="neither .json nor .csv"):
        splice.read_prompt_file(tmp_path / "p.txt")
