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

Where the native kernels are built (:mod:`hf_dataselect.sae.native`), step 1's inputs and steps 2–3 run in C, one
pass per token; on CPUs with AMX the matmul of step 1 runs in the same kernel on AMX tiles, whose float32
accumulations go straight into a running top-``(k + margin)`` per token without ever being stored (they are
not rounded to bfloat16 there, so step 3 needs no rounding term). Otherwise PyTorch does each step.

The result is the float32 TopK of every token (values from float32 arithmetic), as without the screen. It is on
by default where AMX tiles are present (``HF_DATASELECT_SAE_SCREEN=auto``) and off elsewhere: on AVX512-BF16
without AMX the bfloat16 matmul is only ~2x faster and the screen did not pay (benchmarks/results/sae.md).
``HF_DATASELECT_SAE_SCREEN=on`` forces it and ``off`` disables it. The decision depends on the CPU only, not on a
timing, so a machine always encodes the same way.
"""

from __future__ import annotations

import functools
import os

import torch

from hf_dataselect.sae import kernels, native

UNIT_ROUNDOFF = 2.0**-8
DEFAULT_SETTING = "auto"
"""``"auto"``, ``"on"`` or ``"off"``; overridden by ``HF_DATASELECT_SAE_SCREEN``."""
MIN_LATENTS = 1024
"""Below this width the screen saves too little to pay for its bookkeeping."""
CHUNK_TOKENS = 1024
"""Tokens per screened chunk: bfloat16 scores of one chunk (12 MiB at 6,144 latents) stay in cache."""
SAFETY = 1.01
"""Slack on the error bound for the float32 rounding of the norms it is computed from."""
ROUNDING_INFLATION = 2.0**-7
"""Bound factors are scaled by ``1 + 2^-7`` before rounding to the nearest bfloat16 (relative error at most
``2^-8``), so rounding never makes them smaller than the exact values."""
INPUT_BOUND_SCALE = SAFETY * (1 + ROUNDING_INFLATION)
"""What the inputs' two norms are multiplied by before rounding to bfloat16 (both factors above)."""


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
    """Whether to encode ``x`` (float32, or bfloat16 taken as its exact float32 value) through the screen."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == torch.float32
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
            self.snapshot = tuple(
                t.detach().clone() if t is not None else None for t in (weight, bias, shift)
            )
            folded = bias.double()
            if shift is not None:
                folded = folded - weight.double() @ shift.double()
            exact = torch.cat([weight.double(), folded[:, None]], dim=1)
            rounded = exact.to(torch.bfloat16)
            gamma = sum_roundoff(weight.shape[1] + 3)
            rounding = (exact - rounded.double()).norm(dim=1) + gamma * rounded.double().norm(dim=1)
            bound_factors = torch.stack([rounding, exact.norm(dim=1)], dim=1)
            self.augmented = torch.cat([rounded, _rounded_up(SAFETY * bound_factors)], dim=1)

    @functools.cached_property
    def amx_packed(self) -> torch.Tensor:
        """The augmented weights laid out for :func:`native.amx_screened_topk` (built on first use)."""
        return native.pack_for_amx(self.augmented)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x⁺``: the bfloat16 ``[n, d + 3]`` matmul inputs of the module docstring (one pass in C where the
        native kernels are built)."""
        compiled = native.screen_inputs(x, INPUT_BOUND_SCALE)
        if compiled is not None:
            return compiled
        n, d = x.shape
        augmented = torch.empty(n, d + 3, dtype=torch.bfloat16, device=x.device)
        augmented[:, :d] = x
        augmented[:, d] = 1
        rounded = augmented[:, : d + 1].float()
        norms = torch.stack(
            # float32 norms: their relative error, below (d + 2) 2^-24, is covered by SAFETY
            [rounded.norm(dim=1), (x - rounded[:, :d]).norm(dim=1)],  # the difference is exact in float32
            dim=1,
        )
        augmented[:, d + 1 :] = (norms * INPUT_BOUND_SCALE).to(torch.bfloat16)
        return augmented

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The bfloat16 ``[n, latents]`` upper-bound scores ``c`` of the module docstring."""
        return self.inputs(x) @ self.augmented.t()

    def holds(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor | None) -> bool:
        """Whether these are the tensors it was built from, with the same values.

        Values are compared, not version counters: fused optimizers (``torch.optim.Adam(fused=True)``, which
        SAE training uses) update parameters in place without bumping ``_version``, and screening with stale
        weights would select from wrong scores and prove wrong bounds.
        """
        built_from = (self.weight, self.bias, self.shift)
        if any(old is not new for old, new in zip(built_from, (weight, bias, shift), strict=True)):
            return False  # other tensors (or None where there was one): the recompute reads built_from
        return all(
            old is None or native.same_values(old, new)
            for old, new in zip(self.snapshot, built_from, strict=True)
        )

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All float32 pre-activations of ``x`` (the fallback for tokens the screen cannot decide)."""
        rows = x if self.shift is None else x - self.shift
        return kernels.pre_activations(rows, self.weight, self.bias)


def _rounded_up(values: torch.Tensor) -> torch.Tensor:
    """Non-negative ``values`` in bfloat16, never below the originals: inflated by 2^-7 before rounding to
    nearest, whose relative error is at most 2^-8 (plus 2^-24 when float64 goes through float32)."""
    return (values * (1 + ROUNDING_INFLATION)).to(torch.bfloat16)


_last_screened: list[ScreenedWeights] = []


def screened_weights(
    weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor | None = None
) -> ScreenedWeights:
    """:class:`ScreenedWeights` of these tensors, reused while they hold the same values (encoding batch after
    batch with one SAE converts its weights once; the comparison is one ``memcmp`` of the weights)."""
    if not _last_screened or not _last_screened[0].holds(weight, bias, shift):
        _last_screened[:] = [ScreenedWeights(weight, bias, shift)]
    return _last_screened[0]


def default_margin(k: int) -> int:
    """Candidates beyond ``k`` per token: 12 at ``k = 32``, where 0.2 % of real (bf16-exact) tokens need the
    float32 fallback against 1.1 % with 8 and 0.04 % with 16; 12 was the fastest of the three on real MiniLM
    tokens (benchmarks/results/sae.md)."""
    return max(12, (3 * k) // 8)


def screened_topk(
    x: torch.Tensor,
    screened: ScreenedWeights,
    k: int,
    margin: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, indices, recomputed_rows)``: the float32 top-k of ``relu((x - shift) @ W.T + b)``, for float32
    ``x`` or bfloat16 ``x`` (widened exactly: the fused AMX kernel reads it as is, the other paths convert it).

    With the native kernels on a CPU with AMX, steps 1–3 run fused (:func:`native.amx_screened_topk`: the
    scores never reach memory). Otherwise scores are computed ``chunk_tokens`` rows at a time into one reused
    buffer (fresh pages for every chunk cost more than the matmul's arithmetic on AMX), and each chunk's
    selection follows its matmul while the scores are still in cache."""
    n = x.shape[0]
    margin = margin if margin is not None else default_margin(k)
    latents = screened.weight.shape[0]
    k2 = min(latents, k + margin)
    operands = (x, screened.shift, screened.weight, screened.bias, k)
    if native.amx_available():
        fused = native.amx_screened_topk(screened.amx_packed, k2, *operands, INPUT_BOUND_SCALE)
        if fused is not None:
            return _recompute_unproven(x, screened, k, *fused)
    x = x.float()
    operands = (x, *operands[1:])
    augmented = screened.inputs(x)
    buffer = torch.empty(min(n, chunk_tokens), latents, dtype=torch.bfloat16, device=x.device)
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    proven = torch.empty(n, dtype=torch.bool, device=x.device)
    for start in range(0, n, chunk_tokens):
        stop = min(n, start + chunk_tokens)
        scores = torch.matmul(augmented[start:stop], screened.augmented.t(), out=buffer[: stop - start])
        chunk = (x[start:stop], *operands[1:])
        compiled = native.screened_topk(scores, k2, *chunk)
        if compiled is None:
            compiled = _select_and_prove(scores, k2, screened, x[start:stop], k)
        values[start:stop], indices[start:stop], proven[start:stop] = compiled
    return _recompute_unproven(x, screened, k, values, indices, proven)


def _recompute_unproven(
    x: torch.Tensor,
    screened: ScreenedWeights,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    proven: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Step 3's fallback: the float32 TopK of every row the screen could not prove, from all its latents."""
    redo = (~proven).nonzero().squeeze(-1)
    if redo.numel():
        top_values, top_indices = kernels.row_topk(screened.dense(x[redo].float()), k)
        values[redo] = top_values.clamp_min_(0)
        indices[redo] = top_indices
    return values, indices, int(redo.numel())


def _select_and_prove(
    scores: torch.Tensor, k2: int, screened: ScreenedWeights, x: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2–3 in PyTorch (where :func:`native.screened_topk` is not available): ``(values, indices, proven)``."""
    rows = x if screened.shift is None else x - screened.shift
    top_scores, candidates = kernels.row_topk(scores, k2)
    exact = kernels.gathered_dot(candidates, screened.weight, rows) + screened.bias[candidates]
    top_exact, positions = exact.topk(k, dim=-1, sorted=False)
    kth = top_exact.min(dim=1).values.double()
    upper = upper_bound(top_scores.min(dim=1).values)
    proven = (upper < kth) | (upper <= 0)
    return top_exact.clamp_min_(0), candidates.gather(1, positions), proven
