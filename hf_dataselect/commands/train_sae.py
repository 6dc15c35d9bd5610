"""``hf-dataselect train-sae``: train a TopK SAE on a model's hidden states over a pool's texts.

    hf-dataselect train-sae data.jsonl --hookpoint encoder.layer.3 --output sae/ --k 32 --expansion_factor 16
    hf-dataselect train-sae tatsu-lab/alpaca --model meta-llama/Llama-3.2-1B --hookpoint model.layers.12 \\
        --max_tokens 50000000 --checkpoint_dir ckpt/ --checkpoint_every 1000 --output sae/
    hf-dataselect train-sae ... --checkpoint_dir ckpt/ --resume          # continue an interrupted run
    hf-dataselect train-sae ... --push_to_hub me/my-saes                 # upload with its model card
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from hf_dataselect.commands._parser import ConfigParser, make_parser
from hf_dataselect.sae.train import SAETrainingConfig

logger = logging.getLogger("hf_dataselect.train_sae")


@dataclass
class TrainSAEArguments:
    """What to train on and where the result goes (the optimisation options are in SAETrainingConfig)."""

    data: str = field(
        default="",
        metadata={"help": "Pool: JSON/JSONL/CSV/Parquet file, save_to_disk folder or Hub dataset id."},
    )
    model: str | None = field(
        default=None, metadata={"help": "Model path or Hub id (default: the offline all-MiniLM-L6-v2)."}
    )
    hookpoint: str = field(
        default="-1",
        metadata={"help": "Module path (model.layers.12, encoder.layer.3) or layer index (-1 = last)."},
    )
    output: str = field(default="sae", metadata={"help": "Output folder (sparsify layout + model card)."})
    split: str | None = field(default=None, metadata={"help": "Dataset split (default: train)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    text: str = field(default="prompt_response", metadata={"help": "prompt_response, prompt or response."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt."})
    response_column: str | None = field(default=None, metadata={"help": "Column holding the response."})
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Folder for checkpoints and the activation cache (enables --resume)."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the checkpoint in --checkpoint_dir."}
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the result to this Hub repo id."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    license: str = field(default="apache-2.0", metadata={"help": "License written in the model card."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})


def build_parser() -> ConfigParser:
    return make_parser(
        "train-sae",
        "Train a TopK sparse autoencoder (Gao et al. 2024) on a model's hidden states at a hookpoint.",
        [TrainSAEArguments, SAETrainingConfig],
    )


def main(argv: Sequence[str]) -> int:
    from hf_dataselect.data import load_pool
    from hf_dataselect.errors import InputError
    from hf_dataselect.sae.activations import parse_hookpoint
    from hf_dataselect.sae.train import train_sae

    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # the pool may be given positionally
        argv = ["--data", argv[0], *argv[1:]]
    args, config = build_parser().parse_with_config(argv)
    if not args.data:
        raise InputError("Name the pool to train on: hf-dataselect train-sae DATA (or --data DATA).")
    config.validate()
    pool = load_pool(args.data, split=args.split, config=args.dataset_config, max_rows=args.max_rows)
    sae = train_sae(
        args.model,
        pool,
        parse_hookpoint(args.hookpoint),
        config=config,
        output_dir=None,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        text=args.text,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        dataset_name=args.data,
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
    )
    sae.metadata["license"] = args.license
    folder = sae.save_pretrained(args.output)
    meta = sae.metadata
    summary = f"FVU {meta['fvu']:.4f}, L0 {meta['l0']:.1f}, dead {100 * meta['dead_fraction']:.1f} %"
    if "eval_fvu" in meta:
        summary += f", held-out FVU {meta['eval_fvu']:.4f}"
    print(
        f"Saved the SAE for {meta['hookpoint']} to {folder} ({summary}; {meta['training_tokens']:,} tokens)."
    )
    if args.push_to_hub:
        from hf_dataselect.sae.hub import push_to_hub

        url = push_to_hub(args.push_to_hub, args.output, private=args.private, license=args.license)
        print(f"Uploaded to {url}")
    return 0
