"""The compiled SAE kernels (hf_dataselect/sae/native_kernels.c) against the PyTorch code they replace.

On the last-block hidden states of real text (the first ``--rows`` LIMA rows through the offline MiniLM in
bfloat16, as SAEFeatures computes them), with the SAE given by ``--sae``, same inputs, same process:

1. row top-k of the bfloat16 screen's ``[tokens, latents]`` scores (k + margin candidates per token):
   ``torch.topk``; the grouped PyTorch selection (``kernels.row_topk`` with ``HF_DATASELECT_NATIVE=off``);
   the C kernel;
2. the whole ``TopKSAE.encode`` with and without the C kernels, and the float32 TopK without the screen
   (the path of CPUs without AMX) with and without them; the selected latents are checked to be the same.

    python benchmarks/bench_sae_native.py --sae /work/cache/sae_fvu_l5_64m/sae --output benchmarks/results/sae_native.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sae_common import LIMA, lima_rows, texts_of  # noqa: E402


def best_of(repeats: int, work) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def hidden_states(args):
    """``(tokens [n, d] float32, sae)``: the kept tokens' hidden states at the hookpoint, and the loaded SAE."""
    import torch

    from hf_dataselect.transforms.sae_features import SAEFeatures

    runner = SAEFeatures(sae=args.sae, hookpoint=args.hookpoint, batch_size=32).runtime()
    texts = texts_of(lima_rows(args.lima))[: args.rows]
    parts = [batch.activations for batch in runner.reader.batches(texts)]
    return torch.cat(parts).float(), runner.sae


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default="/work/cache/sae_fvu_l5_64m/sae")
    parser.add_argument("--hookpoint", default="encoder.layer.5")
    parser.add_argument("--lima", type=Path, default=LIMA)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sae_native.json")
    args = parser.parse_args()
    import torch

    from hf_dataselect.sae import kernels, native, screening

    if native.library() is None:
        raise SystemExit("The native kernels could not be built here (see the warning above).")
    x, sae = hidden_states(args)
    tokens = x.shape[0]
    k = sae.cfg.k
    candidates = k + screening.default_margin(k)
    screened = screening.ScreenedWeights(sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    chunk = screening.CHUNK_TOKENS
    score_chunks = [screened.scores(x[i : i + chunk]) for i in range(0, tokens, chunk)]

    def pytorch(select):
        os.environ["HF_DATASELECT_NATIVE"] = "off"
        try:
            return select()
        finally:
            os.environ.pop("HF_DATASELECT_NATIVE")

    topk = {
        "torch.topk": best_of(
            args.repeats, lambda: [s.topk(candidates, dim=-1, sorted=False) for s in score_chunks]
        ),
        "grouped PyTorch (kernels.row_topk, native off)": best_of(
            args.repeats, lambda: pytorch(lambda: [kernels.row_topk(s, candidates) for s in score_chunks])
        ),
        "C kernel (native.row_topk)": best_of(
            args.repeats, lambda: [native.row_topk(s, candidates) for s in score_chunks]
        ),
    }
    with torch.no_grad():
        encode_native = best_of(args.repeats, lambda: sae.encode(x))
        encode_pytorch = best_of(args.repeats, lambda: pytorch(lambda: sae.encode(x)))
        os.environ["HF_DATASELECT_SAE_SCREEN"] = "off"
        screening.screening_available.cache_clear()
        encode_float32 = best_of(args.repeats, lambda: pytorch(lambda: sae.encode(x)))
        encode_float32_native = best_of(args.repeats, lambda: sae.encode(x))
        reference = sae.encode(x)
        os.environ.pop("HF_DATASELECT_SAE_SCREEN")
        screening.screening_available.cache_clear()
        fast = sae.encode(x)
    same = bool(
        torch.equal(fast.top_indices.sort(1).values, reference.top_indices.sort(1).values)
        and torch.allclose(fast.top_values.sort(1).values, reference.top_values.sort(1).values, atol=1e-5)
    )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"AMX tiles: {screening._cpu_has_amx()}",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "tokens": tokens,
        "latents": sae.num_latents,
        "k": k,
        "candidates_per_token": candidates,
        "row_topk_seconds": topk,
        "row_topk_us_per_token": {name: 1e6 * seconds / tokens for name, seconds in topk.items()},
        "encode_seconds": {
            "screen + C kernels (default)": encode_native,
            "screen, PyTorch only (HF_DATASELECT_NATIVE=off)": encode_pytorch,
            "float32 TopK, no screen, PyTorch only": encode_float32,
            "float32 TopK, no screen, C row top-k (CPUs without AMX)": encode_float32_native,
        },
        "same_latents_as_float32_topk": same,
    }
    print(json.dumps(report, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
