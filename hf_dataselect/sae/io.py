"""Saving and loading SAEs: our format, EleutherAI sparsify, SAELens. Safetensors only.

Our format *is* the sparsify layout, plus one file of metadata and a model card::

    folder/
      README.md                       model card (all hookpoints of the folder), from model_cards/
      layers.12/cfg.json              sparsify config: activation, expansion_factor, normalize_decoder,
                                      num_latents, k, multi_topk, skip_connection, transcode, d_in
      layers.12/sae.safetensors       encoder.weight [latents, d_in], encoder.bias [latents],
                                      W_dec [latents, d_in], b_dec [d_in] (+ W_skip [d_in, d_in])
      layers.12/hf_dataselect.json    {"config": full SAE config, "metadata": base model, hookpoint, k, width,
                                      training tokens and data, FVU, dead fraction, library version...}

sparsify's ``SparseCoder.load_from_disk`` reads the hookpoint folder as is (it ignores the extra file).

Loading (:func:`load_sae`) accepts a hookpoint folder, a folder of hookpoint folders, or a Hub repo (only the
requested hookpoint's files are downloaded) and recognises:

* **sparsify**: ``cfg.json`` + ``sae.safetensors``. Unknown config keys (``signed`` in old files) are ignored,
  missing ones take sparsify's defaults. ``groupmax`` activations and transcoders are refused.
* **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc``,
  ``W_dec [d_sae, d_in]``, ``b_dec`` (+ ``threshold``). Architectures ``topk``, ``jumprelu`` (its per-latent
  threshold is kept: JumpReLU encoding, not TopK) and ``standard`` (ReLU); ``apply_b_dec_to_input`` is honoured;
  ``normalize_activations`` ``none`` / ``constant_norm_rescale`` / ``layer_norm`` are applied at encoding time;
  ``rescale_acts_by_decoder_norm`` is folded into the weights (an exact reparametrisation). Anything else
  (``expected_average_only_in`` needs a scaling factor that is not in the files, gated SAEs, transcoders,
  ``hook_z`` reshaping...) is refused with a message, never approximated.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    import torch

    from hf_dataselect.sae.model import TopKSAE

CONFIG_FILE = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
METADATA_FILE = "hf_dataselect.json"
MODEL_CARD = "README.md"
SAE_FILES = (CONFIG_FILE, SPARSIFY_WEIGHTS, SAELENS_WEIGHTS, METADATA_FILE)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".npz")

SPARSIFY_DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}
SAELENS_ARCHITECTURES = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


# -- saving ------------------------------------------------------------------------------------------------------
def sparsify_config(sae: TopKSAE) -> dict[str, Any]:
    """``cfg.json`` exactly as sparsify writes it (its dataclass fields + ``d_in``)."""
    cfg = sae.cfg
    return {
        "activation": cfg.activation,
        "expansion_factor": max(1, round(cfg.num_latents / cfg.d_in)),
        "normalize_decoder": cfg.normalize_decoder,
        "num_latents": cfg.num_latents,
        "k": cfg.k if cfg.k is not None else 0,
        "multi_topk": cfg.multi_topk,
        "skip_connection": cfg.skip_connection,
        "transcode": False,
        "d_in": cfg.d_in,
    }


def save_sae(
    sae: TopKSAE, folder: str | os.PathLike, *, hookpoint: str | None = None, model_card: bool = True
) -> Path:
    """Write ``sae`` to ``folder/<hookpoint>/`` (atomically) and refresh ``folder/README.md``."""
    from safetensors.torch import save_file

    from hf_dataselect import __version__

    name = hookpoint or sae.hookpoint
    if not name:
        raise InputError("Saving an SAE needs hookpoint= (its metadata does not name one).")
    check_hookpoint_folder_name(name)
    root = Path(folder)
    target = root / name
    metadata = {**sae.metadata, "hookpoint": name}
    metadata.setdefault("library", "hf_dataselect")
    metadata.setdefault("library_version", __version__)
    tensors = {key: value.detach().contiguous().cpu() for key, value in sae.state_dict().items()}
    with atomic.staging_folder(target, name=target.name + ".partial") as partial:
        save_file(tensors, str(partial / SPARSIFY_WEIGHTS), metadata={"format": "pt"})
        atomic.write_json(partial / CONFIG_FILE, sparsify_config(sae), ensure_ascii=True)
        atomic.write_json(
            partial / METADATA_FILE, {"config": sae.cfg.to_dict(), "metadata": metadata}, ensure_ascii=True
        )
    if model_card:
        write_model_card(root)
    return target


def write_model_card(root: str | os.PathLike, **card_options: Any) -> Path:
    """Render ``root/README.md`` from the metadata of every hookpoint folder in ``root`` (atomic write)."""
    from hf_dataselect.sae.card import render_model_card

    root = Path(root)
    entries = [read_metadata(folder) | {"hookpoint": name} for name, folder in list_hookpoints(root).items()]
    if not entries:
        raise InputError(f"{root} holds no SAE folder to describe.")
    card_options.setdefault("location", str(root))
    text = render_model_card(entries, **card_options)
    return atomic.write_text(root / MODEL_CARD, text)


def read_metadata(folder: Path) -> dict[str, Any]:
    """Our metadata of a hookpoint folder (config shape included), or what the config file tells."""
    meta_file = folder / METADATA_FILE
    if meta_file.is_file():
        data = json.loads(meta_file.read_text())
        config = data.get("config", {})
        return {
            "d_in": config.get("d_in"),
            "num_latents": config.get("num_latents"),
            "k": config.get("k"),
            "activation": config.get("activation", "topk"),
            **data.get("metadata", {}),
        }
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    return {
        "d_in": cfg.get("d_in"),
        "num_latents": cfg.get("num_latents") or cfg.get("d_sae"),
        "k": cfg.get("k"),
    }


def check_hookpoint_folder_name(name: str) -> None:
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise InputError(f"Hookpoint {name!r} cannot be used as a folder name inside the output folder.")


# -- finding the folder -----------------------------------------------------------------------------------------
def list_hookpoints(root: Path, max_depth: int = 4) -> dict[str, Path]:
    """Hookpoint name -> folder, for every folder under ``root`` that holds a ``cfg.json``."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for config in sorted(root.rglob(CONFIG_FILE)):
        folder = config.parent
        relative = folder.relative_to(root)
        if folder == root or len(relative.parts) > max_depth:
            continue
        if any(part.endswith((".partial", ".old")) for part in relative.parts):
            continue
        found[relative.as_posix()] = folder
    return found


def locate_hookpoint_folder(root: Path, hookpoint: str | int | None, *, source: str) -> Path:
    """The folder of ``hookpoint`` inside ``root`` (``root`` itself when it is a hookpoint folder)."""
    from hf_dataselect.sae.activations import hookpoint_folder_candidates

    if (root / CONFIG_FILE).is_file():
        return root
    available = list_hookpoints(root)
    if hookpoint is None:
        if len(available) == 1:
            return next(iter(available.values()))
        if not available:
            raise InputError(f"{source} holds no SAE (no cfg.json); files: {_listing(root)}.")
        raise InputError(
            f"{source} holds SAEs for several hookpoints {sorted(available)}; choose one with hookpoint=."
        )
    for candidate in hookpoint_folder_candidates(hookpoint):
        if candidate in available:
            return available[candidate]
    listed = sorted(available) if available else "none"
    raise InputError(f"{source} has no SAE for hookpoint {str(hookpoint)!r}; hookpoints it holds: {listed}.")


def _listing(folder: Path, limit: int = 20) -> list[str]:
    if not folder.is_dir():
        return []
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


# -- loading -----------------------------------------------------------------------------------------------------
def load_sae(
    repo_or_path: str | os.PathLike,
    hookpoint: str | int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> TopKSAE:
    """Load an SAE (see the module docstring for the formats and where it is looked for)."""
    path = Path(os.path.expanduser(str(repo_or_path)))
    if path.exists():
        root = path
        source = str(path)
    elif _looks_like_local_path(str(repo_or_path)):
        raise InputError(f"No such SAE folder: {repo_or_path}")
    else:
        from hf_dataselect.sae.hub import download_sae

        root = download_sae(str(repo_or_path), hookpoint, revision=revision, token=token)
        source = f"Hub repo {repo_or_path}"
    folder = locate_hookpoint_folder(root, hookpoint, source=source)
    sae = load_sae_folder(folder)
    sae.metadata.setdefault("source", str(repo_or_path))
    if folder != root and "hookpoint" not in sae.metadata:
        sae.metadata["hookpoint"] = folder.relative_to(root).as_posix()
    return _to(sae, device, dtype)


def _looks_like_local_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or (os.sep != "/" and os.sep in text)


def detect_format(folder: Path) -> str:
    """``"hf_dataselect"``, ``"sparsify"`` or ``"saelens"``; a clear error for anything else."""
    files = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    if CONFIG_FILE in files and SPARSIFY_WEIGHTS in files:
        return "hf_dataselect" if METADATA_FILE in files else "sparsify"
    if CONFIG_FILE in files and SAELENS_WEIGHTS in files:
        return "saelens"
    pickled = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickled:
        raise InputError(
            f"{folder} holds {pickled}: only safetensors are read (pickled or numpy checkpoints can run code or "
            "are not supported). Convert the weights to safetensors."
        )
    raise InputError(
        f"Unknown SAE format in {folder}: expected cfg.json with sae.safetensors (sparsify, hf_dataselect) or "
        f"sae_weights.safetensors (SAELens); found {sorted(files) or 'no files'}."
    )


def load_sae_folder(folder: Path) -> TopKSAE:
    """Load the SAE stored in one hookpoint folder, whatever its (supported) format."""
    kind = detect_format(folder)
    if kind == "saelens":
        return _load_saelens(folder)
    return _load_sparsify(folder, ours=kind == "hf_dataselect")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object.")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise InputError(f"Cannot read {path} as safetensors: {err}") from err


def _check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], optional: set[str]
) -> None:
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{path} does not hold the expected tensors: missing {missing}, unexpected {unexpected}; it holds "
            f"{ {k: tuple(v.shape) for k, v in tensors.items()} }."
        )
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise InputError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} from cfg.json."
            )


def _load_sparsify(folder: Path, *, ours: bool) -> TopKSAE:
    from hf_dataselect.sae.model import SAEConfig, TopKSAE

    raw = _read_json(folder / CONFIG_FILE)
    if "d_in" not in raw:
        raise InputError(f"{folder / CONFIG_FILE} has no d_in; it is not a sparsify config.")
    cfg = {**SPARSIFY_DEFAULTS, **{k: v for k, v in raw.items() if k in SPARSIFY_DEFAULTS}}
    extra: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if ours:
        ours_data = _read_json(folder / METADATA_FILE)
        extra = ours_data.get("config", {})
        metadata = dict(ours_data.get("metadata", {}))
    if cfg["transcode"]:
        raise InputError(
            f"{folder} is a sparsify transcoder (it predicts a module's output from its input), not an "
            "autoencoder of the hookpoint's activations; it is not supported."
        )
    activation = extra.get("activation", cfg["activation"])
    if activation == "groupmax":
        raise InputError(f"{folder} uses sparsify's groupmax activation; only TopK SAEs are supported.")
    d_in = int(raw["d_in"])
    tensors = _read_tensors(folder / SPARSIFY_WEIGHTS)
    num_latents = int(cfg["num_latents"] or d_in * int(cfg["expansion_factor"]))
    if "encoder.weight" in tensors and tensors["encoder.weight"].dim() == 2:
        actual = int(tensors["encoder.weight"].shape[0])
        if cfg["num_latents"] and actual != num_latents:
            raise InputError(
                f"{folder}: cfg.json says num_latents={num_latents} but encoder.weight has {actual}."
            )
        num_latents = actual
    expected = {
        "encoder.weight": (num_latents, d_in),
        "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_in),
        "b_dec": (d_in,),
    }
    if cfg["skip_connection"]:
        expected["W_skip"] = (d_in, d_in)
    if activation == "jumprelu":
        expected["threshold"] = (num_latents,)
    _check_tensors(folder / SPARSIFY_WEIGHTS, tensors, expected, optional=set())
    config = SAEConfig.from_dict(
        {
            **extra,
            "d_in": d_in,
            "num_latents": num_latents,
            "k": int(cfg["k"]) if activation == "topk" else None,
            "activation": activation,
            "normalize_decoder": bool(cfg["normalize_decoder"]),
            "skip_connection": bool(cfg["skip_connection"]),
            "multi_topk": bool(cfg["multi_topk"]),
        }
    )
    sae = TopKSAE.from_config(config, dtype=tensors["encoder.weight"].dtype, metadata=metadata, seed=None)
    sae.load_state_dict(tensors)
    sae.metadata.setdefault("format", "hf_dataselect" if ours else "sparsify")
    return sae


def saelens_hookpoint(hook_name: str | None) -> str | None:
    """A layer index for TransformerLens residual hooks (``blocks.7.hook_resid_post`` -> ``"7"``)."""
    if not hook_name:
        return None
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if not match:
        return None
    layer = int(match.group(1)) - (1 if match.group(2) == "pre" else 0)
    return str(layer) if layer >= 0 else None


def _load_saelens(folder: Path) -> TopKSAE:
    import torch

    from hf_dataselect.sae.model import SAEConfig, TopKSAE

    raw = _read_json(folder / CONFIG_FILE)
    if "d_in" not in raw or "d_sae" not in raw:
        raise InputError(f"{folder / CONFIG_FILE} lacks d_in/d_sae; it is not an SAELens config.")
    kwargs = raw.get("activation_fn_kwargs") or {}
    legacy_fn = raw.get("activation_fn_str") or raw.get("activation_fn")
    architecture = raw.get("architecture") or ("topk" if legacy_fn == "topk" else "standard")
    if architecture == "standard" and legacy_fn == "topk":
        architecture = "topk"
    if architecture not in SAELENS_ARCHITECTURES:
        raise InputError(
            f"{folder}: SAELens architecture {architecture!r} is not supported (supported: "
            f"{sorted(SAELENS_ARCHITECTURES)}); its encoding cannot be reproduced exactly."
        )
    if architecture == "standard" and legacy_fn not in (None, "relu"):
        raise InputError(f"{folder}: SAELens activation function {legacy_fn!r} is not supported.")
    normalization = raw.get("normalize_activations") or "none"
    if normalization not in ("none", "constant_norm_rescale", "layer_norm"):
        raise InputError(
            f"{folder}: normalize_activations={normalization!r} is not supported ("
            + (
                "the dataset-wide scaling factor it needs is not stored with the weights"
                if normalization == "expected_average_only_in"
                else "unknown normalisation"
            )
            + "); encoding without it would silently change the features."
        )
    if (raw.get("reshape_activations") or "none") != "none":
        raise InputError(
            f"{folder}: reshape_activations={raw['reshape_activations']!r} (attention heads) is not supported."
        )
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    tensors = _read_tensors(folder / SAELENS_WEIGHTS)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scaling = tensors.pop("finetuning_scaling_factor", tensors.pop("scaling_factor", None))
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise InputError(f"{folder}: a finetuning scaling factor is not supported.")
    activation = SAELENS_ARCHITECTURES[architecture]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if activation == "jumprelu":
        expected["threshold"] = (d_sae,)
    _check_tensors(folder / SAELENS_WEIGHTS, tensors, expected, optional=set())
    k = raw.get("k", kwargs.get("k"))
    if activation == "topk" and k is None:
        raise InputError(f"{folder}: a TopK SAELens config needs k.")
    dtype = tensors["W_enc"].dtype
    config = SAEConfig(
        d_in=d_in,
        num_latents=d_sae,
        k=int(k) if activation == "topk" else None,
        activation=activation,
        normalize_decoder=False,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        input_normalization=normalization,
    )
    meta = raw.get("metadata") or {}
    hook_name = meta.get("hook_name") or raw.get("hook_name")
    model_name = meta.get("model_name") or raw.get("model_name")
    metadata = {
        "format": "saelens",
        "architecture": architecture,
        "saelens_hook_name": hook_name,
        "saelens_model_name": model_name,
    }
    layer = saelens_hookpoint(hook_name)
    if layer is not None:
        metadata["hookpoint"] = layer
    sae = TopKSAE.from_config(
        config, dtype=dtype, metadata={k: v for k, v in metadata.items() if v}, seed=None
    )
    W_enc = tensors["W_enc"].t().contiguous()
    b_enc = tensors["b_enc"]
    W_dec = tensors["W_dec"]
    if activation == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        sae.metadata["folded_decoder_norm"] = True
    state = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": tensors["b_dec"]}
    if activation == "jumprelu":
        state["threshold"] = tensors["threshold"]
    sae.load_state_dict(state)
    return sae


def _to(sae: TopKSAE, device: Any, dtype: Any) -> TopKSAE:
    import torch

    from hf_dataselect import models

    target_device = models.resolve_device(str(device)) if device is not None else torch.device("cpu")
    if isinstance(dtype, str):
        target_dtype = models.resolve_dtype(dtype, target_device)
    elif dtype is None:
        target_dtype = torch.float32 if target_device.type == "cpu" else sae.dtype
    else:
        target_dtype = dtype
    return sae.to(device=target_device, dtype=target_dtype).eval()
