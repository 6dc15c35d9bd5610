"""Exact TopK selection through a bfloat16 screening pass (CPU): the float32 latents, found several times faster.

The encoder's ``[tokens, latents]`` pre-activation matmul dominates SAE encoding. On CPUs with AMX tiles
(Intel Sapphire Rapids and later) oneDNN runs it about 7x faster in bfloat16 than in float32, but bfloat16
values could pick different latents. So bfloat16 only *screens*:

1. ``a = bf16(x') @ bf16(W')`` with ``x' = [x, 1]`` and ``W' = [W | b]`` (float32 accumulation, bfloat16
   output; ``b`` with ``b_dec`` folded in, see :class:`ScreenedWeights`), and the top ``k + margin`` candidates of every token (:func:`kernels.row_topk`);
2. the candidates' pre-activations are recomputed in float32 and the top ``k`` of them kept;
3. a rounding-error bound proves, per token, that no other latent can beat the k-th kept value. For every
   latent ``l``, ``|p_l - a_l| <= u/(1-u) |a_l| + E`` with ``u = 2^-8`` (bfloat16 unit roundoff) and

       E = max_l ‖W'_l - bf16(W'_l)‖ ‖bf16(x')‖ + max_l ‖W'_l‖ ‖x' - bf16(x')‖ + γ max_l ‖bf16(W'_l)‖ ‖bf16(x')‖

   (Cauchy-Schwarz on the two rounding errors, whose norms are measured, not bounded; ``γ = (d+1) 2^-24`` for
   the float32 sums; products of two bfloat16 numbers are exact in float32). Every non-candidate has
   ``a <= r``, the smallest candidate score, hence ``p <= r + u/(1-u) |r| + E``; when that is not below the
   k-th kept value (a near-tie across the margin) the token is recomputed entirely in float32.

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


def sum_roundoff(d_in: int) -> float:
    """``γ_{d+1}``: relative error bound of a float32 sum of ``d_in + 1`` terms."""
    n = (d_in + 1) * 2.0**-24
    return n / (1 - n)


@functools.lru_cache(maxsize=1)
def screening_available() -> bool:
    """Whether to screen here: the setting, AMX tiles for ``auto``, and a bfloat16 matmul within the bound."""
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
        screened = ScreenedWeights(weight, bias)
        approx = screened.scores(x).float()
    except RuntimeError:
        return False
    exact = torch.addmm(bias.double(), x.double(), weight.double().t())
    bound = UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF) * approx.abs() + screened.token_bounds(x)[:, None]
    return bool(((approx.double() - exact).abs() <= bound).all())


def use_screening(x: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[0] >= MIN_LATENTS
        and weight.shape[0] >= 8 * k
        and screening_available()
    )


class ScreenedWeights:
    """The encoder in bfloat16 with its bias as an extra column, and the weight terms of the error bound.

    With ``shift`` (the SAE's ``b_dec``), pre-activations are ``W (x - shift) + b``, screened as
    ``W x + (b - W shift)``: the folded bias is computed in float64, and ``x`` itself is rounded to bfloat16,
    exactly when it holds the hidden states of a bfloat16 model (half the error bound of rounding
    ``x - shift``, which measured 7 % of LIMA tokens recomputed against 0.2 % this way).
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
            self.augmented = exact.to(torch.bfloat16)
            rounded = self.augmented.double()
            self.max_rounding_norm = float((exact - rounded).norm(dim=1).max())
            self.max_row_norm = float(exact.norm(dim=1).max())
            self.max_rounded_norm = float(rounded.norm(dim=1).max())
        self.gamma = sum_roundoff(weight.shape[1])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``bf16([x, 1]) @ bf16([W | b - W shift])ᵀ``, a bfloat16 ``[n, latents]`` matrix."""
        return self._augment(x).to(torch.bfloat16) @ self.augmented.t()

    def exact(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Float32 pre-activations ``W (x - shift) + b`` at ``candidates [n, c]`` (latent ids per row)."""
        rows = x if self.shift is None else x - self.shift
        return kernels.gathered_dot(candidates, self.weight, rows) + self.bias[candidates]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All float32 pre-activations of ``x`` (the fallback for tokens the screen cannot decide)."""
        rows = x if self.shift is None else x - self.shift
        return kernels.pre_activations(rows, self.weight, self.bias)

    def token_bounds(self, x: torch.Tensor) -> torch.Tensor:
        """``E`` of the module docstring for every row of ``x`` (float64)."""
        augmented = self._augment(x)
        rounded = augmented.to(torch.bfloat16).float()
        rounded_norm = rounded.double().norm(dim=1)
        rounding_norm = (augmented - rounded).double().norm(dim=1)  # the difference is exact in float32
        return SAFETY * (
            self.max_rounding_norm * rounded_norm
            + self.max_row_norm * rounding_norm
            + self.gamma * self.max_rounded_norm * rounded_norm
        )

    @staticmethod
    def _augment(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


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
    smallest = top_scores.min(dim=1).values.double()
    u = UNIT_ROUNDOFF
    upper = smallest + u / (1 - u) * smallest.abs() + screened.token_bounds(x)
    proven = (upper < kth) | (upper <= 0)
    values = top_exact.clamp_min_(0)
    redo = (~proven).nonzero().squeeze(-1)
    if redo.numel():
        top_values, top_indices = kernels.row_topk(screened.dense(x[redo]), k)
        values[redo] = top_values.clamp_min_(0)
        indices[redo] = top_indices
    return values, indices, int(redo.numel())
