"""Exact TopK selection through a bfloat16 screening pass (CPU): the float32 latents, found several times faster.

The encoder's ``[tokens, latents]`` pre-activation matmul dominates SAE encoding. On CPUs with AMX tiles
(Intel Sapphire Rapids and later) oneDNN runs it about 7x faster in bfloat16 than in float32, but bfloat16
values could pick different latents. So bfloat16 only *screens*:

1. bfloat16 scores ``c = bf16(x⁺) @ bf16(W⁺)ᵀ`` (float32 accumulation, bfloat16 output) that are *upper bounds*
   of the exact pre-activations ``p``, up to the output's rounding: ``p_l <= c_l + u/(1-u) |c_l|`` with
   ``u = 2^-8`` (bfloat16 unit roundoff). ``x⁺ = [x, 1, ‖bf16(x')‖, ‖x' - bf16(x')‖]`` and
   ``W⁺_l = [W_l, b_l, α_l, β_l]``, where ``x' = [x, 1]`` and ``b`` has ``b_dec`` folded in (see
   :class:`ScreenedWeights`). The last two columns add, to every score, the rounding error of that latent
   and token (Cauchy-Schwarz on the two rounding errors, whose norms are measured, not bounded):

       |p_l - bf16(x')·bf16(W'_l)| <= α_l ‖bf16(x')‖ + β_l ‖x' - bf16(x')‖
       α_l = ‖W'_l - bf16(W'_l)‖ + γ ‖bf16(W'_l)‖,   β_l = ‖W'_l‖

   (``γ = (d+3) 2^-24`` for the float32 sums; products of two bfloat16 numbers are exact in float32; the four
   bound factors are inflated by 2^-7 before rounding to bfloat16 so that rounding cannot shrink them). The
   bound is per latent, so one latent with a large norm or rounding error does not loosen every other one;
2. the top ``k + margin`` latents of every token by ``c`` (:func:`kernels.row_topk`) are the candidates, their
   pre-activations are recomputed in float32 and the top ``k`` of them kept;
3. every other latent has ``c <= r``, the smallest candidate score, hence ``p <= r + u/(1-u) |r|``; when that
   is below the k-th kept value the token is proven, else (a near-tie across the margin) it is recomputed
   entirely in float32.

The result is the float32 TopK of every token (values from float32 arithmetic), as without the screen. It is on
by default where AMX tiles are present (``HF_DATASELECT_SAE_SCREEN=auto``) and off elsewhere: on AVX512-BF16
without AMX the bfloat16 matmul is only ~2x faster and the screen did not pay (benchmarks/results/sae.md).
``HF_DATASELECT_SAE_SCREEN=on`` forces it and ``off`` disables it. The decision depends on the CPU only, not on a
timing, so a machine always encodes the same way.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from hf_dataselect.sae import kernels

UNIT_ROUNDOFF = 2.0**-8
DEFAULT_SETTING = "auto"
"""``"auto"``, ``"on"`` or ``"off"``; overridden by ``HF_DATASELECT_SAE_SCREEN``."""
MIN_LATENTS = 1024
"""Below this width the screen saves too little to pay for its bookkeeping."""
CHUNK_TOKENS = 1024
"""Tokens per screened chunk: bfloat16 scores of one chunk (12 MiB at 6,144 latents) stay in cache."""
SAFETY = 1.01
"""Slack on the error bound for the float32 rounding of the norms it is computed from."""


def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def upper_bound(scores: torch.Tensor) -> torch.Tensor:
    """``c + u/(1-u) |c|`` in float64: what a bfloat16 score ``c`` proves about the exact pre-activation."""
    scores = scores.double()
    return scores + UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF) * scores.abs()


def sum_roundoff(terms: int) -> float:
    """``γ_n``: relative error bound of a float32 sum of ``n`` terms."""
    n = terms * 2.0**-24
    return n / (1 - n)


@functools.lru_cache(maxsize=1)
def screening_available() -> bool:
    """Whether to screen here: the setting, AMX tiles for ``auto``, and scores that bound a float64 reference."""
    setting = os.environ.get("HF_DATASELECT_SAE_SCREEN", DEFAULT_SETTING).strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False
    if setting not in ("1", "true", "on", "yes") and not _cpu_has_amx():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 256, generator=generator) * 0.1
    bias = torch.randn(2048, generator=generator) * 0.01
    x = torch.randn(512, 256, generator=generator)
    try:
        scores = ScreenedWeights(weight, bias).scores(x)
    except RuntimeError:
        return False
    exact = torch.addmm(bias.double(), x.double(), weight.double().t())
    return bool((exact <= upper_bound(scores)).all())


def use_screening(x: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[0] >= MIN_LATENTS
        and weight.shape[0] >= 8 * k
        and screening_available()
    )


class ScreenedWeights:
    """The encoder in bfloat16 with its bias and the per-latent bound factors as extra columns.

    With ``shift`` (the SAE's ``b_dec``), pre-activations are ``W (x - shift) + b``, screened as
    ``W x + (b - W shift)``: the folded bias is computed in float64, and ``x`` itself is rounded to bfloat16,
    exactly when it holds the hidden states of a bfloat16 model, so that only the weights' rounding counts.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.shift = shift
        with torch.no_grad():
            folded = bias.double()
            if shift is not None:
                folded = folded - weight.double() @ shift.double()
            exact = torch.cat([weight.double(), folded[:, None]], dim=1)
            rounded = exact.to(torch.bfloat16)
            gamma = sum_roundoff(weight.shape[1] + 3)
            rounding = (exact - rounded.double()).norm(dim=1) + gamma * rounded.double().norm(dim=1)
            bound_factors = torch.stack([rounding, exact.norm(dim=1)], dim=1)
            self.augmented = torch.cat([rounded, _rounded_up(SAFETY * bound_factors)], dim=1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The bfloat16 ``[n, latents]`` upper-bound scores ``c`` of the module docstring."""
        augmented = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        rounded = augmented.to(torch.bfloat16)
        norms = torch.stack(
            [
                rounded.double().norm(dim=1),
                (augmented - rounded.float()).double().norm(dim=1),  # the difference is exact in float32
            ],
            dim=1,
        )
        return torch.cat([rounded, _rounded_up(SAFETY * norms)], dim=1) @ self.augmented.t()

    def exact(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Float32 pre-activations ``W (x - shift) + b`` at ``candidates [n, c]`` (latent ids per row)."""
        rows = x if self.shift is None else x - self.shift
        return kernels.gathered_dot(candidates, self.weight, rows) + self.bias[candidates]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All float32 pre-activations of ``x`` (the fallback for tokens the screen cannot decide)."""
        rows = x if self.shift is None else x - self.shift
        return kernels.pre_activations(rows, self.weight, self.bias)


def _rounded_up(values: torch.Tensor) -> torch.Tensor:
    """Non-negative ``values`` in bfloat16, never below the originals: inflated by 2^-7 before rounding to
    nearest, whose relative error is at most 2^-8 (plus 2^-24 when float64 goes through float32)."""
    return (values * (1 + 2.0**-7)).to(torch.bfloat16)


_last_screened: list[tuple[tuple[Any, ...], ScreenedWeights]] = []


def screened_weights(
    weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor | None = None
) -> ScreenedWeights:
    """:class:`ScreenedWeights` of these tensors, reused while none of them is modified (encoding batch after
    batch with one SAE converts its weights once)."""
    key = tuple(
        (t.data_ptr(), t._version, tuple(t.shape)) if t is not None else None for t in (weight, bias, shift)
    )
    if not _last_screened or _last_screened[0][0] != key:
        _last_screened[:] = [(key, ScreenedWeights(weight, bias, shift))]
    return _last_screened[0][1]


def screened_topk(
    x: torch.Tensor, screened: ScreenedWeights, k: int, margin: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, indices, recomputed_rows)``: the float32 top-k of ``relu((x - shift) @ W.T + b)``."""
    margin = margin if margin is not None else max(16, k // 2)
    k2 = min(screened.weight.shape[0], k + margin)
    top_scores, candidates = kernels.row_topk(screened.scores(x), k2)
    exact = screened.exact(x, candidates)
    top_exact, positions = exact.topk(k, dim=-1, sorted=False)
    indices = candidates.gather(1, positions)
    kth = top_exact.min(dim=1).values.double()
    upper = upper_bound(top_scores.min(dim=1).values)
    proven = (upper < kth) | (upper <= 0)
    values = top_exact.clamp_min_(0)
    redo = (~proven).nonzero().squeeze(-1)
    if redo.numel():
        top_values, top_indices = kernels.row_topk(screened.dense(x[redo]), k)
        values[redo] = top_values.clamp_min_(0)
        indices[redo] = top_indices
    return values, indices, int(redo.numel())
