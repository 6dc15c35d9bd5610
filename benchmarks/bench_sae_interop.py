"""Interoperability with the real EleutherAI sparsify (eai-sparsify, in its own venv).

1. An SAE saved by hf_dataselect is loaded by ``sparsify.SparseCoder.load_from_disk``; both encode and decode
   the same activations: top-k sets, values and reconstructions are compared.
2. An SAE saved by sparsify's ``save_to_disk`` is loaded by ``TopKSAE.from_pretrained``; same comparison.

    python benchmarks/bench_sae_interop.py --sparsify-python /work/venv-sparsify/bin/python

Light (seconds); the inputs are random activations, the weights random but trained-like (unit decoder rows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SPARSIFY_SIDE = r"""
import json, sys, numpy as np, torch
from sparsify import SparseCoder, SparseCoderConfig
mode, folder, inputs, out = sys.argv[1:5]
x = torch.from_numpy(np.load(inputs))
if mode == "write":
    torch.manual_seed(1)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=1536, k=16))
    sae.b_dec.data.normal_(); sae.encoder.bias.data.normal_(0, 0.05)
    sae.save_to_disk(folder)
else:
    sae = SparseCoder.load_from_disk(folder)
with torch.no_grad():
    top = sae.encode(x)
    rec = sae.decode(top.top_acts, top.top_indices)
np.savez(out, values=top.top_acts.numpy(), indices=top.top_indices.numpy(), reconstruction=rec.numpy())
"""


def compare(ours_values, ours_indices, ours_rec, theirs) -> dict:
    order_ours = np.argsort(ours_indices, axis=1)
    order_theirs = np.argsort(theirs["indices"], axis=1)
    same_sets = np.array_equal(
        np.take_along_axis(ours_indices, order_ours, 1),
        np.take_along_axis(theirs["indices"], order_theirs, 1),
    )
    value_diff = np.abs(
        np.take_along_axis(ours_values, order_ours, 1) - np.take_along_axis(theirs["values"], order_theirs, 1)
    ).max()
    return {
        "same_topk_sets": bool(same_sets),
        "max_value_diff": float(value_diff),
        "max_reconstruction_diff": float(np.abs(ours_rec - theirs["reconstruction"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsify-python", default="/work/venv-sparsify/bin/python")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    from hf_dataselect.sae.model import TopKSAE

    work = Path(tempfile.mkdtemp(prefix="sae_interop_"))
    (work / "side.py").write_text(SPARSIFY_SIDE)
    x = np.random.default_rng(0).normal(size=(500, 384)).astype(np.float32)
    np.save(work / "x.npy", x)
    report = {}

    ours = TopKSAE(384, 1536, 16, seed=3)
    with torch.no_grad():
        ours.b_dec.normal_()
        ours.encoder.bias.normal_(0, 0.05)
    ours.save_pretrained(work / "ours", hookpoint="layers.3")
    subprocess.run(
        [args.sparsify_python, str(work / "side.py"), "read", str(work / "ours" / "layers.3"), str(work / "x.npy"),
         str(work / "theirs_read.npz")],
        check=True, capture_output=True,
    )  # fmt: skip
    with torch.no_grad():
        values, indices = ours.encode(torch.from_numpy(x))
        rec = ours.decode(values, indices)
    report["ours_saved_sparsify_loaded"] = compare(
        values.numpy(), indices.numpy(), rec.numpy(), np.load(work / "theirs_read.npz")
    )

    subprocess.run(
        [args.sparsify_python, str(work / "side.py"), "write", str(work / "theirs"), str(work / "x.npy"),
         str(work / "theirs_write.npz")],
        check=True, capture_output=True,
    )  # fmt: skip
    loaded = TopKSAE.from_pretrained(work / "theirs")
    with torch.no_grad():
        values, indices = loaded.encode(torch.from_numpy(x))
        rec = loaded.decode(values, indices)
    report["sparsify_saved_ours_loaded"] = compare(
        values.numpy(), indices.numpy(), rec.numpy(), np.load(work / "theirs_write.npz")
    )
    report["sparsify_cfg_keys"] = sorted(json.loads((work / "theirs" / "cfg.json").read_text()))
    report["our_cfg_keys"] = sorted(json.loads((work / "ours" / "layers.3" / "cfg.json").read_text()))
    print(json.dumps(report, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
