"""Sparse encoder and decoder operations with hand-written backward passes.

A TopK SAE touches only ``k`` of its ``L`` latents per token, but autograd through ``torch.topk`` and a dense
decoder would build dense ``[tokens, latents]`` gradient matrices and spend as much time in the backward pass
as in the forward matmul. Here:

* :func:`topk_encode` computes the pre-activations chunk by chunk (at most ``chunk_tokens x L`` values exist at
  a time), keeps the top ``k`` per token, and its backward pass builds the encoder gradient from the ``k``
  selected entries only (a sparse ``[L, tokens] @ [tokens, d]`` product);
* :func:`sparse_decode` reconstructs with ``embedding_bag`` (a weighted sum of ``k`` decoder rows per token) and
  computes its gradients from the same ``k`` rows.

Both accept any device and floating dtype; sparse products run in float32 when the weights are half precision
(CPU sparse kernels do not support them).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from hf_dataselect.sae import native

_CHUNK_ELEMENTS = 1 << 24
"""Pre-activation values materialised at once by the encoder (64 MiB in float32)."""


SCREEN_STATS = {"rows": 0, "recomputed": 0}
"""Rows encoded through the bfloat16 screen, and how many of them had to be recomputed in float32."""


def default_chunk_tokens(num_latents: int) -> int:
    """Tokens per encoder chunk so that one chunk of pre-activations holds about 16M values."""
    return max(1, _CHUNK_ELEMENTS // max(1, num_latents))


def pre_activations(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` is ``[latents, d_in]``), into ``out`` when given."""
    return torch.addmm(bias, x, weight.t(), out=out)


def _group_count(width: int, k: int) -> int:
    """Groups per row for :func:`row_topk`: the largest power of two ``g`` with ``g² <= 2 width / k`` that
    divides ``width`` (this balances the two selections, over ``width / g`` maxima and over ``k g`` values),
    or 0 when grouping does not pay (fewer than ``4 k`` groups)."""
    groups = 1
    while (2 * groups) ** 2 * k <= 2 * width and width % (groups * 2) == 0:
        groups *= 2
    return groups if groups >= 4 and width // groups >= 4 * k else 0


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``scores [n, L]`` and their columns, unsorted.

    The same values as ``scores.topk(k, dim=-1)`` (among exactly equal values the columns may differ), found
    with far less work when ``k << L``. ``torch.topk`` runs a selection over all ``L`` values of a row (about
    3 ns per value on CPU, as much as the encoder matmul in bfloat16). Here the columns are split into
    ``g`` strided groups of ``L / g`` (column ``c`` in group ``c mod (L / g)``), and:

    1. the maximum of every group, one vectorised pass (an elementwise max of ``g`` contiguous slices);
    2. the ``k`` groups with the largest maxima;
    3. the top ``k`` of those groups' ``k g`` values.

    Why it is exact: a value ``v`` in a dropped group is at most that group's maximum, which is at most the
    smallest kept maximum; the ``k`` kept maxima are ``k`` distinct entries, so ``v`` is at most the ``k``-th
    largest value and can only be tied with it, in which case the kept groups already hold ``k`` values that
    large. CPU only; elsewhere, or when grouping would not pay, it is ``torch.topk``.

    Where the compiled kernels are available (:mod:`hf_dataselect.sae.native`), they do the same selection
    several times faster and break ties toward the smallest columns; this is the fallback.
    """
    compiled = native.row_topk(scores, k)
    if compiled is not None:
        return compiled
    n, width = scores.shape
    groups = _group_count(width, k) if scores.device.type == "cpu" and scores.is_contiguous() else 0
    if not groups or n == 0:
        top = scores.topk(k, dim=-1, sorted=False)
        return top.values, top.indices
    stride = width // groups
    grouped = scores.view(n, groups, stride)
    kept = grouped.amax(1).topk(k, dim=-1, sorted=False).indices  # [n, k] group ids in 0..stride-1
    members = grouped.gather(2, kept[:, None, :].expand(n, groups, k)).reshape(n, groups * k)
    values, position = members.topk(k, dim=-1, sorted=False)
    columns = (position // k) * stride + kept.gather(1, position % k)
    return values, columns


@torch.no_grad()
def topk_select(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    chunk_tokens: int | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ReLU activations per row of ``x - shift``: ``(values [n, k], indices [n, k])``, chunked.
    ``x`` may be bfloat16 with float32 weights (a bfloat16 model's hidden states): it is taken as its exact
    float32 value and the values are float32.

    ``topk(relu(p))`` and ``relu(topk(p))`` give the same values (ReLU is monotone); the second skips a pass
    over the dense pre-activations. Rows with fewer than ``k`` positive pre-activations get zeros. Where enabled
    (:mod:`hf_dataselect.sae.screening`), the same result is found through a verified bfloat16 screen; passing
    the SAE's ``b_dec`` as ``shift`` (instead of subtracting it first) keeps bfloat16 inputs exact there.
    """
    from hf_dataselect.sae import screening

    n = x.shape[0]
    k = min(k, weight.shape[0])
    screen = screening.use_screening(x, weight, k)
    if x.dtype == torch.bfloat16 and weight.dtype == torch.float32 and not screen:
        x = x.float()  # exact; only the screen reads bfloat16 rows as they are
    if screen:
        screened = screening.screened_weights(weight, bias, shift)
        values, indices, redone = screening.screened_topk(
            x, screened, k, chunk_tokens=chunk_tokens or screening.CHUNK_TOKENS
        )
        SCREEN_STATS["rows"] += n
        SCREEN_STATS["recomputed"] += redone
        return values, indices
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    # one buffer for every chunk's pre-activations: fresh pages per chunk cost about as much as the matmul
    buffer = torch.empty(min(n, chunk), weight.shape[0], dtype=torch.result_type(x, weight), device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = x[start:stop] if shift is None else x[start:stop] - shift
        scores = pre_activations(rows, weight, bias, out=buffer[: stop - start])
        top_values, top_indices = row_topk(scores, k)
        values[start:stop] = top_values.clamp_min_(0)
        indices[start:stop] = top_indices
    return values, indices


def scatter_outer(
    indices: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, num_latents: int
) -> torch.Tensor:
    """``out[l] = sum over (n, j) with indices[n, j] == l of coefficients[n, j] * rows[n]`` -> ``[L, d]``.

    Computed as a sparse ``[L, n] @ [n, d]`` product, which is several times faster on CPU than
    ``index_add_`` of ``n * k`` outer products and never builds a dense ``[n, L]`` matrix.
    """
    n, k = indices.shape
    compute_dtype = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    token_ids = torch.arange(n, device=indices.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), token_ids]),
        coefficients.reshape(-1).to(compute_dtype),
        (num_latents, n),
        check_invariants=False,
    )
    return torch.sparse.mm(sparse, rows.to(compute_dtype)).to(rows.dtype)


def gathered_dot(indices: torch.Tensor, weight: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out[n, j] = weight[indices[n, j]] · vectors[n]`` -> ``[n, k]``.

    A sampled dense-dense product (``torch.sparse.sampled_addmm``: ``vectors @ weight.T`` evaluated only at the
    ``n x k`` selected positions), about 6x faster on CPU than gathering ``n x k`` weight rows. Codes with a
    repeated index in a row (zero padding of JumpReLU codes) and half-precision inputs use the gather.
    """
    n, k = indices.shape
    if vectors.dtype in (torch.float32, torch.float64) and k > 0 and n > 0:
        sorted_indices, order = indices.sort(dim=1)
        if k == 1 or bool((sorted_indices[:, 1:] != sorted_indices[:, :-1]).all()):
            crow = torch.arange(0, n * k + 1, k, device=indices.device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                pattern = torch.sparse_csr_tensor(
                    crow,
                    sorted_indices.reshape(-1),
                    torch.zeros(n * k, dtype=vectors.dtype, device=vectors.device),
                    (n, weight.shape[0]),
                    check_invariants=False,
                )
            sampled = torch.sparse.sampled_addmm(pattern, vectors, weight.to(vectors.dtype).t(), beta=0.0)
            return torch.empty_like(sampled.values().view(n, k)).scatter_(
                1, order, sampled.values().view(n, k)
            )
    out = torch.empty(n, k, dtype=vectors.dtype, device=vectors.device)
    chunk = max(1, (1 << 22) // max(1, k * weight.shape[1]))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = weight[indices[start:stop]].to(vectors.dtype)  # [c, k, d]
        out[start:stop] = torch.bmm(rows, vectors[start:stop].unsqueeze(-1)).squeeze(-1)
    return out


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, chunk_tokens):
        values, indices = topk_select(x, weight, bias, k, chunk_tokens)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, weight, values, indices = ctx.saved_tensors
        grad = grad_values * (values > 0)  # ReLU derivative; unselected latents get no gradient
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = scatter_outer(indices, grad, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            grad_bias.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_weight, grad_bias, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, weight):
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_values = gathered_dot(indices, weight, grad_out.to(weight.dtype)).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = scatter_outer(indices, values.to(weight.dtype), grad_out, weight.shape[0])
        return None, grad_values, grad_weight


def topk_encode(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk(relu(x @ weight.T + bias))`` as ``(values, indices)``, differentiable w.r.t. x, weight, bias."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _TopKEncode.apply(x, weight, bias, k, chunk_tokens)
    return topk_select(x, weight, bias, k, chunk_tokens)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_j values[n, j] * weight[indices[n, j]]`` -> ``[n, d]`` (no bias), differentiable."""
    if torch.is_grad_enabled() and (values.requires_grad or weight.requires_grad):
        return _SparseDecode.apply(indices, values, weight)
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


@torch.no_grad()
def threshold_select(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor | None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU (``threshold`` given) or ReLU activations, stored sparse as padded ``(values, indices)``.

    The number of active latents varies per token; rows are padded with zeros to the largest count in the
    batch, so the result decodes exactly like a TopK code.
    """
    n = x.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    width = 1
    for start in range(0, n, chunk):
        pre = pre_activations(x[start : min(n, start + chunk)], weight, bias)
        active = pre > (threshold if threshold is not None else 0)
        acts = torch.where(active, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        count = int(active.sum(-1).max()) if pre.shape[0] else 0
        width = max(width, count)
        top = acts.topk(max(1, count), dim=-1, sorted=False)
        parts.append((top.values, top.indices))
    values = torch.zeros(n, width, dtype=x.dtype, device=x.device)
    indices = torch.zeros(n, width, dtype=torch.long, device=x.device)
    start = 0
    for part_values, part_indices in parts:
        stop = start + part_values.shape[0]
        values[start:stop, : part_values.shape[1]] = part_values
        indices[start:stop, : part_indices.shape[1]] = part_indices
        start = stop
    return values, indices
