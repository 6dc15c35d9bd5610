"""Exact TopK selection with a bfloat16 screening pass (CPU): the same latents as float32, about 1.5x faster.

The encoder's ``[tokens, latents]`` pre-activation matmul dominates SAE encoding. On CPUs with bfloat16 dot
products it runs about 2.3x faster in bfloat16, but bfloat16 values could pick different latents. So bfloat16
only *screens*:

1. ``ã = bf16(x) @ bf16([W | b])`` (float32 accumulation), and the top ``2k`` candidates per token;
2. the candidates' pre-activations are recomputed exactly in float32 and the top ``k`` of them kept;
3. a rigorous rounding-error bound proves, per token, that no non-candidate can beat the k-th kept value:
   every non-candidate has ``ã <= r`` (the smallest candidate score), hence
   ``p <= r + u|r|/(1-u) + c (||x|| max_j ||w_j|| + max_j |b_j|)`` with ``u = 2^-8`` (bfloat16 unit roundoff)
   and ``c = 1.01 (2u + u² + γ_{d+1} (1+u)²)``; tokens where this does not hold below the k-th value
   (rare: a near-tie spanning the margin) are recomputed entirely in float32.

The result is the float32 TopK of every token (values from float32 arithmetic). The screen is off by default
(measured gain: 27 % of the encoding time on one core, none on two contended cores; see
benchmarks/results/sae.md). ``HF_DATASELECT_SAE_SCREEN=auto`` uses it on CPUs where a one-off probe shows that
bfloat16 matmuls are faster *and* stay within the error bound above; ``=1`` forces it (after the bound check).
"""

from __future__ import annotations

import functools
import os
import time

import torch

from hf_dataselect.sae import kernels

UNIT_ROUNDOFF = 2.0**-8
DEFAULT_SETTING = "off"
"""``"auto"``, ``"on"`` or ``"off"``; overridden by ``HF_DATASELECT_SAE_SCREEN``."""
MIN_LATENTS = 1024
"""Below this width the screen saves too little to pay for its bookkeeping."""


def error_constant(d_in: int) -> float:
    gamma = (d_in + 1) * 2.0**-24 / (1 - (d_in + 1) * 2.0**-24)
    u = UNIT_ROUNDOFF
    return 1.01 * (2 * u + u * u + gamma * (1 + u) ** 2)


@functools.lru_cache(maxsize=1)
def screening_available() -> bool:
    """Whether bf16 screening pays off here: a CPU bf16 matmul that is faster and within the error bound."""
    setting = os.environ.get("HF_DATASELECT_SAE_SCREEN", DEFAULT_SETTING).strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=generator)
    w = torch.randn(2048, 256, generator=generator) * 0.1
    try:
        exact = x @ w.t()
        approx = (x.bfloat16() @ w.bfloat16().t()).float()
    except RuntimeError:
        return False
    bound = (
        error_constant(256) * x.norm(dim=1, keepdim=True) * w.norm(dim=1)
        + UNIT_ROUNDOFF / (1 - UNIT_ROUNDOFF) * approx.abs()
    )
    if not bool(((approx - exact).abs() <= bound).all()):
        return False
    if setting in ("1", "true", "on", "yes"):
        return True
    xb, wb = x.bfloat16(), w.bfloat16()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: xb @ wb.t()) < 0.7 * best(lambda: x @ w.t())


def use_screening(x: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[0] >= MIN_LATENTS
        and weight.shape[0] >= 8 * k
        and screening_available()
    )


class ScreenedWeights:
    """The encoder in bfloat16 with its bias as an extra column, and the constants of the error bound."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight
        self.bias = bias
        self.augmented = torch.cat([weight, bias[:, None]], dim=1).bfloat16()
        self.max_row_norm = float(weight.norm(dim=1).max())
        self.max_bias = float(bias.abs().max()) if bias.numel() else 0.0
        self.constant = error_constant(weight.shape[1])


def screened_topk(
    x: torch.Tensor, screened: ScreenedWeights, k: int, margin: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, indices, recomputed_rows)``: the exact float32 top-k of ``relu(x @ W.T + b)`` for a chunk."""
    n = x.shape[0]
    margin = margin if margin is not None else max(16, k)
    k2 = min(screened.weight.shape[0], k + margin)
    augmented_x = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1).bfloat16()
    scores = augmented_x @ screened.augmented.t()  # bf16 [n, L]
    top_scores, candidates = scores.topk(k2, dim=-1, sorted=False)
    del scores
    exact = kernels.gathered_dot(candidates, screened.weight, x) + screened.bias[candidates]
    top_exact, positions = exact.topk(k, dim=-1, sorted=False)
    indices = candidates.gather(1, positions)
    kth = top_exact.min(dim=1).values
    smallest = top_scores.float().min(dim=1).values
    u = UNIT_ROUNDOFF
    upper = (
        smallest
        + u / (1 - u) * smallest.abs()
        + screened.constant * (x.norm(dim=1) * screened.max_row_norm + screened.max_bias)
    )
    proven = (upper < kth) | (upper <= 0)
    values = top_exact.clamp_min_(0)
    redo = (~proven).nonzero().squeeze(-1)
    if redo.numel():
        pre = kernels.pre_activations(x[redo], screened.weight, screened.bias)
        top = pre.topk(k, dim=-1, sorted=False)
        values[redo] = top.values.clamp_min_(0)
        indices[redo] = top.indices
    return values, indices, int(redo.numel())
