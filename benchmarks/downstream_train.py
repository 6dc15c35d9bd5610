"""One training run of the downstream proxy (started by ``bench_downstream.py train`` under the heavy-job lock).

Reads a run spec (JSON: the selection file, epochs, evaluation epochs, training seed), trains the fixed proxy
Llama from scratch on the selected rows with ``trl.SFTTrainer`` and evaluates the held-out macro loss with
:class:`hf_dataselect.evaluation.HeldOutLossCallback` at the listed epochs. The result JSON is written
atomically at the end, so an interrupted run leaves nothing behind and is simply run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downstream_common import ModelSetup, log, read_jsonl, setup_dict, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from hf_dataselect.evaluation import EvalSet, HeldOutLossCallback
    from hf_dataselect.recipes import sft_examples

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    spec = json.loads(args.spec.read_text())
    cache = Path(spec["cache"])
    setup = ModelSetup()
    selection = json.loads(Path(spec["selection"]).read_text())
    pool = read_jsonl(cache / "pool.jsonl")
    rows = [pool[p] for p in selection["positions"]]
    subset = Dataset.from_dict(
        {"prompt": [r["train_prompt"] for r in rows], "completion": [r["train_completion"] for r in rows]}
    )
    eval_sets = []
    for name in ("inpool", "transfer"):
        data = read_jsonl(cache / f"eval_{name}.jsonl")
        eval_sets.append(
            EvalSet(
                prompts=[r["train_prompt"] for r in data],
                responses=[r["train_completion"] for r in data],
                labels=[r["template"] for r in data],
                name=name,
            )
        )

    tokenizer = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    torch.manual_seed(spec["train_seed"])
    model = LlamaForCausalLM(setup.llama_config(tokenizer))
    train_dataset = sft_examples(subset, conversational=True)
    with tempfile.TemporaryDirectory(prefix="downstream-") as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,
            num_train_epochs=spec["epochs"],
            per_device_train_batch_size=setup.batch_size,
            learning_rate=setup.learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=setup.warmup_steps,
            weight_decay=setup.weight_decay,
            max_length=None,  # rows were cut to the text budget when the pool was built
            activation_checkpointing=False,  # TRL turns it on by default; a 3M-parameter model does not need it
            train_sampling_strategy="group_by_length",
            logging_steps=25,
            save_strategy="no",
            report_to=[],
            seed=spec["train_seed"],
            data_seed=spec["train_seed"],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        callback = HeldOutLossCallback(
            eval_sets,
            tokenizer,
            epochs=spec["eval_epochs"],
            batch_size=32,
            max_length=None,
            chat_template=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    write_json(
        Path(spec["result"]),
        {
            "spec": spec,
            "setup": setup_dict(),
            "rows": len(rows),
            "train_seconds": seconds,
            "train_loss": output.training_loss,
            "steps": trainer.state.global_step,
            "records": callback.records,
            "log_history": [e for e in trainer.state.log_history if "loss" in e],
        },
    )
    last = callback.records[-1]
    log(
        f"{spec['name']}: {len(rows)} rows, {seconds:.0f} s, in-pool macro {last['inpool']['macro_loss']:.3f}, "
        f"transfer macro {last['transfer']['macro_loss']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
