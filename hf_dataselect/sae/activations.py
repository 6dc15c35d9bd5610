"""Hidden states of a Hugging Face model at a hookpoint, one token per row, special tokens dropped.

Hookpoints are module paths of the model, or layer indices:

* ``"layers.12"`` / ``"model.layers.12"`` (Llama-like causal LMs), ``"encoder.layer.3"`` /
  ``"bert.encoder.layer.3"`` (BERT-like encoders), or any other submodule path;
* an int (or a string of one) ``i``: the output of transformer block ``i`` (negative counts from the end, so
  ``-1`` is the last block, the paper's "final-layer residual stream").

Names are canonicalised relative to the *base* model (``model.base_model``), as EleutherAI sparsify names its
hookpoint folders: ``model.layers.12`` on a ``LlamaForCausalLM`` becomes ``layers.12``.

The forward pass stops as soon as the hookpoint's module has produced its output (the later layers are
skipped), and the positions of special tokens (BOS/CLS/SEP/EOS...) and padding are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MAX_DEFAULT_LENGTH = 2048
"""Default truncation for SAE activations: the model's context, but at most this many tokens."""


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: its canonical name, the module, and the block index when it is a block."""

    name: str
    module: nn.Module
    layer_index: int | None = None


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of transformer blocks of ``model`` (path relative to its base model)."""
    from torch import nn

    base = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    exact = [(n, m) for n, m in candidates if num_layers is not None and len(m) == num_layers]
    chosen = exact or sorted(candidates, key=lambda item: -len(item[1]))
    if not chosen:
        raise InputError(f"Cannot find the transformer blocks of {type(model).__name__}; name a module path.")
    return chosen[0]


def parse_hookpoint(hookpoint: str | int | None) -> str | int | None:
    """``"12"``/``"-1"`` -> int; other strings unchanged."""
    if isinstance(hookpoint, str):
        text = hookpoint.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        return text or None
    return hookpoint


def resolve_hookpoint(model: nn.Module, hookpoint: str | int | None) -> Hookpoint:
    """The module of ``model`` at ``hookpoint`` (``None`` = the last transformer block)."""
    hookpoint = parse_hookpoint(hookpoint)
    base = getattr(model, "base_model", model)
    layers_path, layers = find_layer_list(model)
    if hookpoint is None:
        hookpoint = -1
    if isinstance(hookpoint, int) and not isinstance(hookpoint, bool):
        n = len(layers)
        if not -n <= hookpoint < n:
            raise InputError(
                f"Layer index {hookpoint} is out of range: the model has {n} blocks (0..{n - 1})."
            )
        index = hookpoint % n
        return Hookpoint(f"{layers_path}.{index}", layers[index], index)
    if not isinstance(hookpoint, str):
        raise InputError(f"hookpoint must be a module path or a layer index, got {hookpoint!r}.")
    modules = dict(base.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [hookpoint]
    if prefix and hookpoint.startswith(prefix + "."):
        candidates.append(hookpoint[len(prefix) + 1 :])
    for name in candidates:
        if name in modules and name:
            index = _layer_index(name, layers_path)
            return Hookpoint(name, modules[name], index)
    full_modules = dict(model.named_modules())
    if hookpoint in full_modules:  # a module outside the base model (e.g. a head): keep the full path
        return Hookpoint(hookpoint, full_modules[hookpoint], None)
    raise InputError(
        f"Hookpoint {hookpoint!r} is not a module of {type(model).__name__}. Use a layer index "
        f"(0..{len(layers) - 1}, or -1 for the last block) or a module path such as "
        f"{layers_path}.0 .. {layers_path}.{len(layers) - 1}."
    )


def _layer_index(name: str, layers_path: str) -> int | None:
    head, _, tail = name.rpartition(".")
    return int(tail) if head == layers_path and tail.isdigit() else None


def hookpoint_folder_candidates(hookpoint: str | int) -> list[str]:
    """Folder names under which an SAE for ``hookpoint`` may be stored in a multi-hookpoint repo."""
    text = str(hookpoint)
    names = [text]
    head, _, rest = text.partition(".")
    if rest and head in ("model", "transformer", "bert", "roberta", "gpt_neox", "base_model"):
        names.append(rest)
    if isinstance(parse_hookpoint(hookpoint), int):
        names += [f"layers.{text}", f"encoder.layer.{text}", f"h.{text}", f"layer_{text}"]
    return names


# -- hidden states -------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the capture hook once the hookpoint's output is in hand (skips the remaining layers)."""


@dataclass
class TokenActivations:
    """Activations of the kept tokens of a few rows, in row order."""

    rows: np.ndarray
    """Positions (in the ``texts`` given to :meth:`HiddenStateReader.batches`) of these rows."""
    lengths: np.ndarray
    """Kept tokens per row (aligned with ``rows``); the rows' tokens are consecutive in ``activations``."""
    activations: torch.Tensor
    """``[sum(lengths), d]`` hidden states on the model's device."""


class HiddenStateReader:
    """Runs a model on texts and yields the hidden states at one hookpoint, without special tokens."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hookpoint: str | int | None,
        *,
        max_length: int | None = None,
        batch_size: int = 32,
        stop_early: bool = True,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"  # positions stay 0..n-1 for models that ignore the mask in them
        self.hookpoint = resolve_hookpoint(model, hookpoint)
        model_max = getattr(model.config, "max_position_embeddings", None) or MAX_DEFAULT_LENGTH
        self.max_length = int(max_length or min(model_max, MAX_DEFAULT_LENGTH))
        self.batch_size = batch_size
        self.stop_early = stop_early
        self.special_ids = sorted({int(i) for i in tokenizer.all_special_ids if i is not None})
        self._width: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        """Width of the hookpoint's output (measured once on a one-word input)."""
        if self._width is None:
            self._width = int(self._forward(self.tokenizer(["hello"], return_tensors="pt")).shape[-1])
        return self._width

    def _forward(self, features) -> torch.Tensor:
        import torch

        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple | list) else output)
            if self.stop_early:
                raise _StopForward

        handle = self.hookpoint.module.register_forward_hook(hook)
        inputs = {k: v.to(self.device) for k, v in features.items() if k in ("input_ids", "attention_mask")}
        try:
            with torch.inference_mode():
                self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise InputError(f"The hookpoint {self.hookpoint.name!r} did not run during the forward pass.")
        hidden = captured[0]
        if hidden.dim() != 3:
            raise InputError(
                f"The hookpoint {self.hookpoint.name!r} outputs a tensor of shape {tuple(hidden.shape)}; "
                "an SAE needs [batch, tokens, width]."
            )
        return hidden

    def batches(self, texts: Sequence[str], *, sort_by_length: bool = True) -> Iterator[TokenActivations]:
        """Model batches of ``texts`` (longest first when sorted, so padding is small)."""
        import torch

        if not texts:
            return
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_special_tokens_mask=True,
        )
        ids = encoded["input_ids"]
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(ids))
        special = torch.tensor(self.special_ids, dtype=torch.long) if self.special_ids else None
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            features = self.tokenizer.pad(
                {
                    "input_ids": [ids[i] for i in chosen],
                    "special_tokens_mask": [encoded["special_tokens_mask"][i] for i in chosen],
                },
                return_tensors="pt",
                padding=True,
            )
            hidden = self._forward(features)
            keep = features["attention_mask"].bool() & ~features["special_tokens_mask"].bool()
            if special is not None:
                keep &= ~torch.isin(features["input_ids"], special)
            keep = keep.to(hidden.device)
            yield TokenActivations(
                rows=chosen, lengths=keep.sum(1).cpu().numpy(), activations=hidden[keep].detach()
            )


def load_reader(
    model: str | None,
    hookpoint: str | int | None,
    *,
    max_length: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> HiddenStateReader:
    """Load ``model`` (``None``: the offline all-MiniLM-L6-v2) and its tokenizer into a reader.

    ``dtype``: a name (``"auto"``: fp32 on CPU, see :func:`hf_dataselect.models.resolve_dtype`) or a torch dtype.
    """
    from hf_dataselect import models
    from hf_dataselect.onednn_fusion import fuse_linear_gelu

    tokenizer = models.load_tokenizer(model, trust_remote_code=trust_remote_code)
    lm = models.load_model(
        model, kind="base", device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    fuse_linear_gelu(lm)
    return HiddenStateReader(lm, tokenizer, hookpoint, max_length=max_length, batch_size=batch_size)
