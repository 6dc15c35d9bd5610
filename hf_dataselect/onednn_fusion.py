"""Fused Linear + GELU for bf16 inference on CPU (oneDNN post-op).

In a BERT-family encoder run in bf16 on a CPU, the GELU after each block's intermediate projection costs about
8 % of the forward pass: it is a separate pass over the widest activation of the block ([tokens, 4·hidden]),
and element-wise kernels gain nothing from bf16. oneDNN can apply the GELU inside the matrix multiplication as a
post-op, where it is almost free (``benchmarks/results/embeddings.md``). PyTorch exposes that kernel as
``torch.ops.mkldnn._linear_pointwise``, the op its own inductor backend emits for this pattern on CPU.

The op is private, so :func:`fuse_linear_gelu` is defensive: it only touches modules shaped like
``BertIntermediate`` (a ``dense`` ``nn.Linear`` followed by ``intermediate_act_fn``), and for each one it first
checks on a random input that the fused forward equals the module's own forward (to bf16 rounding); a module
that fails the check, or a torch without the op, is left as it is. Inference only: the op has no backward, so with autograd recording the module's own forward runs.
``HF_DATASELECT_FUSED_GELU=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("hf_dataselect")

ENVIRONMENT_SWITCH = "HF_DATASELECT_FUSED_GELU"
_CHECK_TOKENS = 64
_CHECK_TOLERANCE = 2e-2  # relative to the output's largest magnitude: a few bf16 ulps


def fusion_available(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs in bf16 on the CPU with oneDNN's fused linear op present (and not switched off)."""
    import torch

    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cpu" and parameter.dtype == torch.bfloat16


def fuse_linear_gelu(model: torch.nn.Module) -> int:
    """Route every verified ``dense`` + exact-GELU module of ``model`` through the fused kernel.

    Returns the number of modules fused (0 when fusion is not available for this model).
    """
    if not fusion_available(model):
        return 0
    fused = 0
    for name, module in model.named_modules():
        if not _is_linear_then_activation(module):
            continue
        if _is_exact_gelu(module.intermediate_act_fn) and _fused_matches(module):
            module.forward = functools.partial(_fused_forward, module.dense, module.forward)
            fused += 1
        else:
            logger.debug("Not fusing %s: its forward differs from Linear + exact GELU.", name)
    return fused


def _is_linear_then_activation(module: torch.nn.Module) -> bool:
    import torch

    return isinstance(getattr(module, "dense", None), torch.nn.Linear) and isinstance(
        getattr(module, "intermediate_act_fn", None), torch.nn.Module
    )


def _is_exact_gelu(activation: torch.nn.Module) -> bool:
    """``activation`` is the erf GELU (not the tanh approximation, not another function): checked on a grid."""
    import torch

    grid = torch.linspace(-6.0, 6.0, 1201)
    try:
        with torch.inference_mode():
            return bool(torch.allclose(activation(grid), torch.nn.functional.gelu(grid), rtol=0, atol=1e-6))
    except (RuntimeError, TypeError):
        return False


def _fused_forward(
    dense: torch.nn.Linear, unfused: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor
) -> torch.Tensor:
    import torch

    if torch.is_grad_enabled() and dense.weight.requires_grad:
        return unfused(hidden_states)  # the fused op has no backward
    return torch.ops.mkldnn._linear_pointwise(
        hidden_states.contiguous(), dense.weight, dense.bias, "gelu", [], "none"
    )


def _fused_matches(module: torch.nn.Module) -> bool:
    """The fused forward reproduces ``module.forward`` on a seeded random input (and the op runs)."""
    import torch

    dense = module.dense
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, _CHECK_TOKENS, dense.in_features, generator=generator).to(dense.weight.dtype)
    try:
        with torch.inference_mode():
            expected = module(probe).float()
            got = _fused_forward(dense, module.forward, probe).float()
    except RuntimeError as error:
        logger.debug("oneDNN fused linear unavailable: %s", error)
        return False
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and float((got - expected).abs().max()) <= _CHECK_TOLERANCE * scale
