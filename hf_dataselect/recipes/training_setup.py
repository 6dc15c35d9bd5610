"""What training needs besides the selected rows: the model (``testing:`` models included) and SFT examples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

TESTING_MODEL_PREFIX = "testing:"
TESTING_MODELS = ("tiny-llama", "tiny-reward-model")


# -- models ----------------------------------------------------------------------------------------------------
def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``testing:tiny-llama`` / ``testing:tiny-reward-model`` -> a local folder built once; anything else as is.

    The ``testing:`` models are the random-init models of :mod:`hf_dataselect.testing`: they make CPU recipes and
    tests run end to end without the network; they learn, but know nothing before training.
    """
    if not name.startswith(TESTING_MODEL_PREFIX):
        return name
    which = name[len(TESTING_MODEL_PREFIX) :]
    if which not in TESTING_MODELS:
        raise InputError(
            f"Unknown test model {name!r}; available: {[TESTING_MODEL_PREFIX + m for m in TESTING_MODELS]}."
        )
    root = Path(cache_dir or os.environ.get("HF_DATASELECT_CACHE", Path.home() / ".cache" / "hf_dataselect"))
    folder = root / "models" / which
    if (folder / "config.json").is_file():
        return str(folder)
    from hf_dataselect.testing import build_tiny_causal_lm, build_tiny_reward_model

    build = build_tiny_causal_lm if which == "tiny-llama" else build_tiny_reward_model
    try:
        with atomic.staging_folder(folder, replace=False) as staging:
            build(staging)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent build that won the race
            raise
    return str(folder)


def load_model_for_training(model_args: Any, training: dict[str, Any]):
    """The causal LM and tokenizer named by a ``trl.ModelConfig`` (safetensors only), plus its PEFT config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model_path(model_args.model_name_or_path)
    trust = bool(training.get("trust_remote_code", False))
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": trust,
    }
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=trust
    )
    peft_config = None
    if model_args.use_peft:
        try:
            from trl import get_peft_config

            peft_config = get_peft_config(model_args)
        except ImportError as err:
            raise InputError("model.use_peft needs the peft package: pip install peft.") from err
    return model, tokenizer, peft_config


# -- data for SFT ------------------------------------------------------------------------------------------------
def sft_examples(
    dataset: Dataset,
    *,
    conversational: bool,
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> Dataset:
    """Rows of any instruction format as TRL prompt-completion examples.

    ``conversational=True``: a user turn and an assistant turn (the tokenizer's chat template applies);
    otherwise plain text ``prompt + "\\n\\n"`` / ``response`` (SFTTrainer appends EOS). Either way the loss is on
    the response only, and :func:`hf_dataselect.evaluation.heldout_loss` tokenizes held-out pairs the same way.
    Multi-turn conversations are flattened into one user turn, as the selectors see them.
    """
    from datasets import Dataset

    from hf_dataselect.data import pool_prompt_response
    from hf_dataselect.formatting import RowFormat, check_texts
    from hf_dataselect.scoring import PairEncoder

    row_format = RowFormat.resolve(
        dataset.column_names, prompt_column=prompt_column, response_column=response_column
    )
    prompts, responses = pool_prompt_response(dataset, row_format)
    check_texts(prompts, responses, need_response=True)
    if conversational:
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": p}] for p in prompts],
                "completion": [[{"role": "assistant", "content": r}] for r in responses],
            }
        )
    return Dataset.from_dict(
        {"prompt": [p + PairEncoder.separator for p in prompts], "completion": responses}
    )


def uses_chat_template(tokenizer: Any, training: dict[str, Any]) -> bool:
    """Train (and evaluate) with the chat template when the tokenizer has one or the recipe provides one."""
    return bool(getattr(tokenizer, "chat_template", None)) or bool(training.get("chat_template_path"))
