"""How well an SAE reconstructs held-out activations, and how much the model notices the splice.

:func:`fve` and :func:`normalized_mse` on tensors; :class:`ReconstructionAccumulator` gives them (and MSE, the
loss's squared error, L0, dead and dense fractions) over a stream of batches exactly, the variance merged with
Chan's formula so that a large shared mean does not cancel away precision; :func:`zero_shot_fidelity` splices
the SAE into an open_clip CLIP at the tapped layer and compares the zero-shot class distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def _check_pair(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x_BD.shape != x_hat_BD.shape:
        raise ValueError(f"x {tuple(x_BD.shape)} and x_hat {tuple(x_hat_BD.shape)} must have the same shape.")
    d = x_BD.shape[-1] if x_BD.dim() else 1
    return x_BD.detach().reshape(-1, d).double(), x_hat_BD.detach().reshape(-1, d).double()


def fve(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Fraction of variance explained: 1 = perfect, 0 = no better than the batch mean."""
    x, x_hat = _check_pair(x_BD, x_hat_BD)
    total = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - (x - x_hat).pow(2).sum() / total) if total > 0 else math.nan


def normalized_mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x||^2."""
    x, x_hat = _check_pair(x_BD, x_hat_BD)
    total = x.pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total) if total > 0 else math.nan


def _active_per_latent(codes_BF: torch.Tensor) -> tuple[torch.Tensor, int]:
    """([F] count of samples where each latent is nonzero, on the codes' device; number of samples)."""
    if codes_BF.layout == torch.strided:
        flat = codes_BF.detach().reshape(-1, codes_BF.shape[-1])
        return (flat != 0).sum(0), flat.shape[0]
    coo = (codes_BF if codes_BF.layout == torch.sparse_coo else codes_BF.to_sparse_coo()).coalesce()
    cols = coo.indices()[1][coo.values() != 0]
    return torch.bincount(cols, minlength=codes_BF.shape[1]), codes_BF.shape[0]


class ReconstructionAccumulator:
    """Exact streaming FVE / MSE / normalised MSE / L0 / dead and dense fractions over batches.

    The sums stay float64 tensors on the device of the data (``device``, else that of the first
    batch), so updating never waits for the GPU; ``result()`` reads them once. Accumulators of
    disjoint streams combine exactly with :meth:`merge` (DDP ranks: ``state_dict`` / ``from_state``
    are same-shaped tensors to all-gather when ``d_in`` and ``n_latents`` are given).
    """

    def __init__(
        self,
        n_latents: int | None = None,
        dense_threshold: float = 0.1,
        d_in: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.dense_threshold = dense_threshold
        self.n = 0
        self.n_codes = 0
        self.mean_D: torch.Tensor | None = None
        self.m2 = self.sse = self.sum_sq = None  # sum ||x - mean||^2, sum ||x - x_hat||^2, sum ||x||^2
        self.fired_F = torch.zeros(n_latents, dtype=torch.long, device=device) if n_latents else None
        if d_in is not None:
            self._init_sums(d_in, device)

    def _init_sums(self, d: int, device: str | torch.device | None) -> None:
        self.mean_D = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2, self.sse, self.sum_sq = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))

    def _add_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al.: merge a (count, mean, M2) summary into ours exactly."""
        total = self.n + n_b
        delta = mean_b - self.mean_D
        self.m2 = self.m2 + m2_b + delta.pow(2).sum() * (self.n * n_b / total)
        self.mean_D = self.mean_D + delta * (n_b / total)
        self.n = total

    def _add_fired(self, counts_F: torch.Tensor, n_rows: int) -> None:
        if self.fired_F is None:
            self.fired_F = torch.zeros_like(counts_F)
        self.fired_F += counts_F.to(self.fired_F.device)
        self.n_codes += n_rows

    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, codes_BF: torch.Tensor | None = None) -> None:
        x, x_hat = _check_pair(x_BD, x_hat_BD)
        n_b = x.shape[0]
        if n_b == 0:
            return
        if self.mean_D is None:
            self._init_sums(x.shape[1], x.device)
        x, x_hat = x.to(self.mean_D.device), x_hat.to(self.mean_D.device)
        mean_b = x.mean(0)
        self._add_moments(n_b, mean_b, (x - mean_b).pow(2).sum())
        self.sse = self.sse + (x - x_hat).pow(2).sum()
        self.sum_sq = self.sum_sq + x.pow(2).sum()
        if codes_BF is not None:
            self._add_fired(*_active_per_latent(codes_BF))

    def merge(self, other: ReconstructionAccumulator) -> ReconstructionAccumulator:
        """Add the batches ``other`` has seen (a disjoint stream, e.g. another rank's); returns self."""
        if other.n:
            if self.mean_D is None:
                self._init_sums(other.mean_D.numel(), other.mean_D.device)
            dev = self.mean_D.device
            self._add_moments(other.n, other.mean_D.to(dev), other.m2.to(dev))
            self.sse = self.sse + other.sse.to(dev)
            self.sum_sq = self.sum_sq + other.sum_sq.to(dev)
        if other.fired_F is not None:
            self._add_fired(other.fired_F, other.n_codes)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every sum as a tensor (counts included): what one rank all-gathers for :meth:`from_state`."""
        if self.mean_D is None or self.fired_F is None:
            raise ValueError("state_dict() needs the shapes: build the accumulator with d_in and n_latents.")
        dev = self.mean_D.device
        return {
            "n": torch.tensor(self.n, device=dev),
            "n_codes": torch.tensor(self.n_codes, device=dev),
            "mean_D": self.mean_D,
            "m2": self.m2,
            "sse": self.sse,
            "sum_sq": self.sum_sq,
            "fired_F": self.fired_F,
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], dense_threshold: float = 0.1) -> ReconstructionAccumulator:
        acc = cls(dense_threshold=dense_threshold)
        acc.n, acc.n_codes = int(state["n"]), int(state["n_codes"])
        acc.mean_D, acc.m2, acc.sse, acc.sum_sq = state["mean_D"], state["m2"], state["sse"], state["sum_sq"]
        acc.fired_F = state["fired_F"]
        return acc

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("No activations were given: the batch iterable was empty.")
        d = self.mean_D.numel()
        m2, sse, sum_sq = float(self.m2), float(self.sse), float(self.sum_sq)
        out: dict[str, Any] = {
            "fve": 1.0 - sse / m2 if m2 > 0 else math.nan,
            "mse": sse / (self.n * d),
            "sq_err": sse / self.n,
            "normalized_mse": sse / sum_sq if sum_sq > 0 else math.nan,
            "n_samples": self.n,
        }
        if self.fired_F is not None and self.n_codes:
            fired_F = self.fired_F.cpu()
            freq_F = fired_F.double() / self.n_codes
            out.update(
                l0=float(fired_F.sum()) / self.n_codes,
                dead_fraction=float((fired_F == 0).double().mean()),
                dense_fraction=float((freq_F > self.dense_threshold).double().mean()),
                dense_threshold=self.dense_threshold,
                freq_F=freq_F,
            )
        return out


def _splice_hook(sae: Callable[[torch.Tensor], torch.Tensor], tokens: str, batch_first: bool):
    """A forward hook replacing a block's residual output by the SAE's reconstruction."""

    def hook(_module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        x_BTD = x if batch_first or x.dim() == 2 else x.transpose(0, 1)
        if x_BTD.dim() == 2:  # projected embedding [B, E]
            new = sae(x_BTD.float()).to(x.dtype)
        elif tokens == "cls":
            new = x_BTD.clone()
            new[:, 0] = sae(x_BTD[:, 0].float()).to(x.dtype)
        else:
            B, T, D = x_BTD.shape
            new = sae(x_BTD.reshape(B * T, D).float()).reshape(B, T, D).to(x.dtype)
        if not batch_first and new.dim() == 3:
            new = new.transpose(0, 1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@torch.no_grad()
def zero_shot_fidelity(
    clip_model: torch.nn.Module,
    sae: Callable[[torch.Tensor], torch.Tensor],
    layer: int | str,
    images: Iterable[torch.Tensor],
    text_tokens: torch.Tensor,
    labels: Sequence[int] | None = None,
    tokens: str = "all",
) -> dict[str, Any]:
    """Zero-shot classification with and without the SAE spliced into the vision tower.

    clip_model: an open_clip ``CLIP`` (has ``encode_image``, ``encode_text``, ``logit_scale``).
    sae: maps [N, D] -> [N, D] (an SAE's ``forward``: decode(encode(x))).
    layer: block index (output of ``visual.transformer.resblocks[layer]``) or ``"last"`` (the
        projected image embedding).  tokens: ``all`` tokens pass through the SAE, or ``cls`` only.
    images: iterable of preprocessed image batches [B, C, H, W].  text_tokens: tokenized class prompts [C, L].
    Returns ``kl`` (mean KL(p_original || p_spliced) of the softmax over classes at the model's
    logit scale), ``top1_agreement``, and ``accuracy_original`` / ``accuracy_spliced`` when labels are given.
    """
    if tokens not in ("all", "cls"):
        raise ValueError(f"tokens={tokens!r}: splice 'all' tokens or only the 'cls' token.")
    clip_model = clip_model.eval()
    text_YE = torch.nn.functional.normalize(clip_model.encode_text(text_tokens).float(), dim=-1)
    scale = float(clip_model.logit_scale.exp())
    visual = clip_model.visual
    if layer == "last":
        target, batch_first = visual, True
    else:
        blocks = visual.transformer.resblocks
        layer = int(layer)
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"layer={layer} but the vision tower has {len(blocks)} blocks (0..{len(blocks) - 1}).")
        target, batch_first = blocks[layer], getattr(visual.transformer, "batch_first", True)
    device = next(clip_model.parameters()).device

    def logits_of(x_BCHW: torch.Tensor) -> torch.Tensor:
        img_BE = torch.nn.functional.normalize(clip_model.encode_image(x_BCHW.to(device)).float(), dim=-1)
        return scale * img_BE @ text_YE.T

    kl_sum, pred_orig, pred_sae = 0.0, [], []
    for x_BCHW in images:
        logits_orig = logits_of(x_BCHW)
        handle = target.register_forward_hook(_splice_hook(sae, tokens, batch_first))
        try:
            logits_sae = logits_of(x_BCHW)
        finally:
            handle.remove()
        logp_orig = logits_orig.log_softmax(-1)
        logp_sae = logits_sae.log_softmax(-1)
        kl_sum += float((logp_orig.exp() * (logp_orig - logp_sae)).sum())
        pred_orig.append(logits_orig.argmax(-1).cpu())
        pred_sae.append(logits_sae.argmax(-1).cpu())
    n = sum(p.numel() for p in pred_orig)
    if n == 0:
        raise ValueError("zero_shot_fidelity: no images were given.")
    orig_N, spliced_N = torch.cat(pred_orig), torch.cat(pred_sae)
    agree = int((orig_N == spliced_N).sum())
    out: dict[str, Any] = {"kl": kl_sum / n, "top1_agreement": agree / n, "n_images": n, "logit_scale": scale}
    if labels is not None:
        y = torch.as_tensor(list(labels))
        if y.numel() != n:
            raise ValueError(f"{y.numel()} labels for {n} images; give one label per image or none.")
        out["accuracy_original"] = float((orig_N == y).double().mean())
        out["accuracy_spliced"] = float((spliced_N == y).double().mean())
    return out
