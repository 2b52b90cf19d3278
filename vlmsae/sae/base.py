"""The SAE base class: parameters, input checks, input scaling, encode/decode, and the shared loss.

z = (x - b_dec) @ W_enc.T + b_enc,   f = activation(z),   x_hat = f @ W_dec + b_dec      (METHOD §2)

Each architecture (relu.py, topk.py, batchtopk.py, matryoshka.py) only says how pre-activations
become codes, at inference (:meth:`SAE._activate`) and in training (:meth:`SAE._train_codes`);
everything else lives here.

Input scaling: parameters and the loss live in the scaled space x_s = s * x (``input_scale`` s, set by
:func:`vlmsae.sae.mechanics.set_input_scale_`, E||x_s||^2 = d_in), so learning rates and l1_coeff transfer
across layers and ``recon / d_in`` is about 1 - FVE. The public API takes and returns raw units. ReLU, top-k and
thresholds commute with a positive scale, so this equals an SAE with b_enc/s, b_dec/s, threshold/s (what
:meth:`SAE.fold_input_scale_` writes and checkpoints store): codes are coefficients of the unit-norm decoder
rows in raw units. Every entry point computes in float32 with autocast off (:mod:`vlmsae.sae.precision`).

Inputs (:meth:`SAE.check_input`): any leading dims ``[..., D]``; ``encode(x, sparse=True)`` and ``loss(x)``
need ``[B, D]``; float16/bfloat16/float64 are cast to the SAE's dtype (``check_finite = False`` skips NaN/inf).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmsae.sae.config import SAEConfig
from vlmsae.sae.precision import fp32_region
from vlmsae.sae.select import Preacts, masked_topk_exact
from vlmsae.sae.sparse import gather_preacts, sparse_decode


def _fp32_compute(method):
    """Run an SAE entry point with autocast off and float32 matmuls at full precision (the precision
    policy, vlmsae.sae.precision): selection and values never depend on the caller's autocast."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with fp32_region(self.W_enc.device):
            return method(self, *args, **kwargs)

    return wrapper


def auxk_loss(
    residual_BD: torch.Tensor,
    z_BF: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int,
    W_dec_FD: torch.Tensor,
    preacts_of=None,
    preacts: Preacts | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al., METHOD §2): dead latents learn to explain what the live ones miss.

    Each sample's top-``k_aux`` dead pre-activations (through ReLU, so they are real codes) decode *without*
    bias into e_hat; the loss is ||e - e_hat||^2 / ||e - mean(e)||^2 for the residual e = x - x_hat (detached).
    ``preacts_of`` (rows, cols[, values]) -> vals gives differentiable values when ``z_BF`` is detached (sparse
    path); ``preacts`` (the step's :class:`vlmsae.sae.select.Preacts`) makes the choice exact.
    """
    e_BD = residual_BD.detach().float()
    batch_size = z_BF.shape[0]
    rows_Z = torch.arange(batch_size, device=z_BF.device).repeat_interleave(k_aux)
    if preacts is not None:
        cols_Z, exact_Z = masked_topk_exact(preacts, dead_F, k_aux)
        if preacts_of is not None:
            vals_Z = preacts_of(rows_Z, cols_Z, exact_Z)
        else:  # dense autograd: the canonical values with z's gradient
            vals_Z = z_BF[rows_Z, cols_Z]
            vals_Z = vals_Z + (exact_Z - vals_Z).detach()
    else:
        with torch.no_grad():
            masked_BF = z_BF.detach().masked_fill(~dead_F, float("-inf"))
            cols_BK = masked_BF.topk(k_aux, dim=1, sorted=False).indices
        cols_Z = cols_BK.reshape(-1)
        vals_Z = z_BF[rows_Z, cols_Z] if preacts_of is None else preacts_of(rows_Z, cols_Z)
    # Alive latents can only be picked when fewer than k_aux are dead in a row of z: mask them out.
    vals_Z = vals_Z.relu() * dead_F[cols_Z].to(vals_Z.dtype)
    e_hat_BD = sparse_decode(rows_Z, cols_Z, vals_Z, W_dec_FD, batch_size).float()
    denom = (e_BD - e_BD.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (e_BD - e_hat_BD).pow(2).sum() / denom


@dataclass
class TrainCodes:
    """Training-time codes of one batch, dense ([B, F] with grad) or sparse (rows, cols, vals).

    ``z_BF``: the pre-activations, with grad only on the dense float32 path. ``preacts``: the selection's
    pre-activations with their error bound (TopK family, :mod:`vlmsae.sae.select`), for AuxK's choice.
    """

    z_BF: torch.Tensor
    codes_BF: torch.Tensor | None = None
    rows_Z: torch.Tensor | None = None
    cols_Z: torch.Tensor | None = None
    vals_Z: torch.Tensor | None = None
    preacts: Preacts | None = None

    @property
    def is_sparse(self) -> bool:
        return self.codes_BF is None

    def decode(self, W_dec_FD: torch.Tensor) -> torch.Tensor:
        """x_hat without the bias -> [B, D]."""
        if self.is_sparse:
            return sparse_decode(self.rows_Z, self.cols_Z, self.vals_Z, W_dec_FD, self.z_BF.shape[0])
        return self.codes_BF.to(W_dec_FD.dtype) @ W_dec_FD

    def decode_groups(self, W_dec_FD: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """Each consecutive latent group's contribution to x_hat (no bias) -> [B, G, D]; sparse: one decode into
        B*G bags (bag = row * G + group), not G decodes."""
        if not self.is_sparse:
            groups = zip(self.codes_BF.split(group_sizes, dim=1), W_dec_FD.split(group_sizes))
            return torch.stack([codes_BF.to(W_dec_FD.dtype) @ W_FD for codes_BF, W_FD in groups], dim=1)
        n_groups, batch_size = len(group_sizes), self.z_BF.shape[0]
        bounds_G = torch.tensor(group_sizes, device=self.cols_Z.device).cumsum(0)
        group_Z = torch.bucketize(self.cols_Z, bounds_G, right=True)
        bags_Z = self.rows_Z * n_groups + group_Z
        x_hat_BGD = sparse_decode(bags_Z, self.cols_Z, self.vals_Z, W_dec_FD, batch_size * n_groups)
        return x_hat_BGD.view(batch_size, n_groups, -1)

    def stats(self, n_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(l0 = mean active per sample, l1 = mean sum of codes per sample, fired_F bool), detached."""
        batch_size = self.z_BF.shape[0]
        with torch.no_grad():
            if not self.is_sparse:
                active_BF = self.codes_BF > 0
                return active_BF.sum() / batch_size, self.codes_BF.sum() / batch_size, active_BF.any(dim=0)
            active_Z = self.vals_Z > 0
            fired_F = torch.zeros(n_latents, device=self.vals_Z.device).index_add_(0, self.cols_Z, active_Z.float()) > 0
            return active_Z.sum() / batch_size, self.vals_Z.sum() / batch_size, fired_F


class SAE(nn.Module):
    """Base sparse autoencoder; see the module docstring for the parameterisation and units.

    Parameters: ``W_enc`` [F, D], ``b_enc`` [F], ``W_dec`` [F, D] (unit-norm rows), ``b_dec`` [D]. Buffers:
    ``input_scale``, ``threshold`` (scalar, scaled space, < 0 = not estimated; BatchTopK family),
    ``samples_since_fired`` [F], ``n_steps``. Only training-mode ``loss()`` changes state.
    """

    arch: str = "base"
    uses_auxk: bool = True
    check_finite: bool = True
    """Refuse NaN/inf inputs in encode/loss (one reduction and host sync per call; set False to skip)."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE needs an SAEConfig; got {type(cfg).__name__}.")
        if not cfg.is_resolved:  # a config node straight from conf/sae/*.yaml: its size is not known yet
            raise ValueError(
                f"SAE needs d_in and n_latents; got d_in={cfg.d_in}, n_latents={cfg.n_latents}: "
                "use cfg.resolved(d_in) (a Hydra node: vlmsae.config.to_typed(node, SAEConfig).resolved(d_in))."
            )
        self.cfg = cfg
        n_latents, d_in = cfg.n_latents, cfg.d_in
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_FD = torch.randn(n_latents, d_in, generator=generator)
        W_FD /= W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(W_FD.clone())
        self.W_enc = nn.Parameter(W_FD.clone())  # W_enc = W_dec^T in the paper's column convention
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("samples_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("n_steps", torch.tensor(0, dtype=torch.long))
        # What the SAE reads (model, layer, tokens): set by training or load_sae, saved with the weights,
        # so steering and evaluation find the tapped layer without being told.
        self.trained_on: dict[str, Any] = {}
        # The Lightning trainer's precision setting (e.g. "bf16-mixed"), recorded in config.json next to the
        # SAE's own policy (float32 inside, see vlmsae.sae.precision); set by the Lightning module or load_sae.
        self.trainer_precision: str | None = None

    # ------------------------------------------------------------------ shape facts
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def group_sizes(self) -> list[int]:
        """Latents per Matryoshka group ([n_latents] for other architectures)."""
        return self.cfg.group_sizes

    @property
    def group_of_latent(self) -> torch.Tensor:
        """LongTensor [F]: the Matryoshka group of each latent (all 0 for other architectures)."""
        sizes = torch.tensor(self.group_sizes, device=self.W_dec.device)
        return torch.arange(len(self.group_sizes), device=self.W_dec.device).repeat_interleave(sizes)

    @property
    def dead_latents(self) -> torch.Tensor:
        """Bool [F]: latents that have not fired for ``cfg.dead_after_samples`` training samples."""
        return self.samples_since_fired >= self.cfg.dead_after_samples

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, n_latents={self.n_latents}, k={self.cfg.k}"

    # ------------------------------------------------------------------ input checks
    def check_input(self, x: torch.Tensor, where: str, require_2d: bool = False) -> torch.Tensor:
        """Validate activations and cast them to the SAE's dtype; errors name the problem and the fix."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor of activations, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(
                f"{where}: expected floating-point activations, got dtype {x.dtype}; convert with x.float()."
            )
        if x.dim() == 0 or x.shape[-1] != self.d_in or (require_2d and x.dim() != 2):
            want = "[B, d_in]" if require_2d else "[..., d_in]"
            raise ValueError(
                f"{where}: expected activations of shape {want} with d_in={self.d_in}; got shape {tuple(x.shape)}."
            )
        if x.device != self.W_enc.device:
            raise ValueError(
                f"{where}: activations are on {x.device} but the SAE is on {self.W_enc.device}; move one with .to()."
            )
        x = x.to(self.W_enc.dtype)  # a no-op when it already is
        if self.check_finite and not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            bad_row = int(torch.nonzero(~torch.isfinite(x.reshape(-1, self.d_in)).all(dim=1))[0])
            raise ValueError(
                f"{where}: the batch contains {n_nan} NaN and {n_inf} inf values (first bad row {bad_row}); "
                "SAE inputs must be finite: check the activation extraction (fp16 overflow?)."
            )
        return x

    # ------------------------------------------------------------------ raw-unit public API
    def _raw_biases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b_enc, b_dec, threshold) in raw units: the scaled ones divided by input_scale."""
        s = self.input_scale
        return self.b_enc / s, self.b_dec / s, self.threshold / s

    @_fp32_compute
    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations z [..., F] in raw units (z_scaled / input_scale)."""
        x = self.check_input(x, "encode_pre")
        return self._encode_pre(x.reshape(-1, self.d_in)).reshape(*x.shape[:-1], self.n_latents)

    def _encode_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        b_enc, b_dec, _ = self._raw_biases()
        return torch.addmm(b_enc, x_BD - b_dec, self.W_enc.T)

    @_fp32_compute
    def encode(self, x: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """Inference codes [..., F] (dense), or a coalesced sparse COO [B, F] when ``sparse=True`` (x must be 2-D)."""
        x = self.check_input(x, "encode", require_2d=sparse)
        b_enc, b_dec, threshold = self._raw_biases()
        codes_BF = self._infer_codes(x.reshape(-1, self.d_in) - b_dec, b_enc, threshold).codes_BF
        if sparse:
            return codes_BF.to_sparse_coo().coalesce()
        return codes_BF.reshape(*x.shape[:-1], self.n_latents)

    @_fp32_compute
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x_hat [..., D] in raw units from dense codes [..., F] or sparse COO codes [B, F]."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"decode: expected a torch.Tensor of codes, got {type(codes).__name__}.")
        if codes.dim() == 0 or codes.shape[-1] != self.n_latents:
            raise ValueError(
                f"decode: expected codes of shape [..., n_latents] with n_latents={self.n_latents}; "
                f"got shape {tuple(codes.shape)}."
            )
        if not (codes.is_floating_point() or (codes.is_sparse and codes.dtype.is_floating_point)):
            raise TypeError(f"decode: expected floating-point codes, got dtype {codes.dtype}; convert with .float().")
        b_dec = self._raw_biases()[1]
        if codes.is_sparse:
            if codes.dim() != 2:
                raise ValueError(f"decode: sparse codes must be 2-D [B, F]; got shape {tuple(codes.shape)}.")
            return torch.sparse.mm(codes.to(self.W_dec.dtype), self.W_dec) + b_dec
        flat_BF = codes.reshape(-1, self.n_latents).to(self.W_dec.dtype)
        return torch.addmm(b_dec, flat_BF, self.W_dec).reshape(*codes.shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [..., D] in raw units (inference encoder)."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ architecture hooks
    def _activate(self, z_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Inference codes from pre-activations (any consistent units; ``threshold`` in the same units)."""
        raise NotImplementedError

    def _infer_codes(self, x_cent_BD: torch.Tensor, b_enc_F: torch.Tensor, threshold: torch.Tensor) -> TrainCodes:
        """Inference codes of centred inputs (raw or scaled units, ``b_enc_F`` and ``threshold`` in the same)."""
        z_BF = torch.addmm(b_enc_F, x_cent_BD, self.W_enc.T)
        return TrainCodes(z_BF=z_BF, codes_BF=self._activate(z_BF, threshold))

    def _train_codes(self, x_cent_BD: torch.Tensor) -> TrainCodes:
        """Training codes from centred scaled inputs x_s - b_dec (grad flows to all parameters)."""
        return self._infer_codes(x_cent_BD, self.b_enc, self.threshold)

    def _recon_objective(self, x_s_BD: torch.Tensor, codes: TrainCodes) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(objective, x_hat_s, extra logs). Plain SAEs: objective = recon error of the full decode."""
        x_hat_BD = codes.decode(self.W_dec) + self.b_dec
        return recon_error(x_s_BD, x_hat_BD), x_hat_BD, {}

    def _sparsity_penalty(self, codes: TrainCodes) -> torch.Tensor | None:
        return None

    def _after_train_step(self, codes: TrainCodes) -> None:
        """State updates after a training batch (BatchTopK: the threshold EMA)."""

    # ------------------------------------------------------------------ loss
    @_fp32_compute
    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of one batch ``x`` [B, D] (raw units); only "loss" carries gradient.

        Keys: loss, recon (sum sq err over dims, mean over batch, scaled space), aux (AuxK, unweighted), l1 (mean
        sum of codes; relu: the penalty sum_j f_j||W_dec_j||), l0, x_hat (raw units), fired_F (bool [F]);
        Matryoshka adds recon_prefix [G].
        """
        x_BD = self.check_input(x, "loss", require_2d=True)
        x_s_BD = x_BD * self.input_scale
        x_cent_BD = x_s_BD - self.b_dec
        if self.training:
            codes = self._train_codes(x_cent_BD)
        else:
            codes = self._infer_codes(x_cent_BD, self.b_enc, self.threshold)
        total, x_hat_s_BD, extra = self._recon_objective(x_s_BD, codes)
        l0, l1, fired_F = codes.stats(self.n_latents)
        penalty = self._sparsity_penalty(codes)
        if penalty is not None:
            total = total + self.cfg.l1_coeff * penalty
            l1 = penalty.detach()
        aux = torch.zeros((), device=x_BD.device)
        if self.training:
            if self.uses_auxk and self.cfg.aux_k_coeff > 0:
                aux = self._auxk(x_s_BD, x_hat_s_BD, x_cent_BD, codes)
                total = total + self.cfg.aux_k_coeff * aux
            self.samples_since_fired.add_(x_BD.shape[0]).masked_fill_(fired_F, 0)  # samples since each last fired
            self.n_steps += 1
            self._after_train_step(codes)
        return {
            "loss": total,
            "recon": recon_error(x_s_BD.detach(), x_hat_s_BD.detach()),
            "aux": aux.detach(),
            "l1": l1,
            "l0": l0,
            "x_hat": (x_hat_s_BD.detach() / self.input_scale),
            "fired_F": fired_F,
            **extra,
        }

    def _auxk(self, x_s_BD, x_hat_s_BD, x_cent_BD, codes: TrainCodes) -> torch.Tensor:
        dead_F = self.dead_latents
        n_dead = int(dead_F.sum())  # one host sync: AuxK's k depends on it (paper: min(d/2, #dead))
        if n_dead == 0:
            return torch.zeros((), device=x_s_BD.device)
        k_aux = min(self.cfg.aux_k or max(1, self.d_in // 2), n_dead)
        preacts_of = None
        if codes.preacts is not None and not codes.z_BF.requires_grad:  # values from the exact selection

            def preacts_of(rows_Z, cols_Z, exact_Z):
                return gather_preacts(x_cent_BD, self.W_enc, self.b_enc, rows_Z, cols_Z, values_Z=exact_Z)

        elif codes.is_sparse:

            def preacts_of(rows_Z, cols_Z):
                return gather_preacts(x_cent_BD, self.W_enc, self.b_enc, rows_Z, cols_Z, preacts_BF=codes.z_BF)

        return auxk_loss(
            x_s_BD - x_hat_s_BD, codes.z_BF, dead_F, k_aux, self.W_dec, preacts_of=preacts_of, preacts=codes.preacts
        )

    # ------------------------------------------------------------------ scale folding
    @torch.no_grad()
    def fold_input_scale_(self) -> None:
        """Bake input_scale into the biases and threshold (s -> 1); every raw-unit output is unchanged."""
        s = self.input_scale.clone()
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        if self.threshold.dim() or float(self.threshold) >= 0:  # JumpReLU's [F] commutes with s for any sign
            self.threshold.div_(s)
        self.input_scale.fill_(1.0)

    def _warn_no_threshold(self) -> None:
        if not getattr(self, "_warned_threshold", False):
            warnings.warn(
                f"{self.arch} SAE: the inference threshold is not estimated yet (it starts after "
                f"threshold_start_step={self.cfg.threshold_start_step} training steps); encoding with per-sample "
                "top-k instead.",
                stacklevel=4,
            )
            self._warned_threshold = True


def recon_error(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dims, mean over the batch (METHOD §2), computed in float32 or wider."""
    diff_BD = x_hat_BD.float() - x_BD.float()
    return diff_BD.pow(2).sum(dim=-1).mean()
