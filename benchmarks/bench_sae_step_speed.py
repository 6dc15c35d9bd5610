"""Tokens/s of one TopK-SAE training step on fixed activation batches, for one implementation per process.

    python benchmarks/bench_sae_step_speed.py --impl ours --batches batches.npy --out ours.json
    /work/venv-sparsify/bin/python benchmarks/bench_sae_step_speed.py --impl sparsify --batches ... --out ...
    python benchmarks/bench_sae_step_speed.py --impl naive ...

Every implementation does the same work per step (the Gao et al. / sparsify recipe): FVU loss (+ AuxK on the
latents marked dead when --dead-fraction > 0, weight 1/32), backward, decoder-gradient projection, Adam step,
decoder renormalisation, dead-latent bookkeeping. ``sparsify`` is EleutherAI's SparseCoder (eai-sparsify, its own
venv) driven exactly like its Trainer drives it; ``naive`` is a dense PyTorch TopK SAE (plain autograd through
topk and a dense [tokens, latents] code). Run by bench_sae_training.py, which compares them.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def _dead_mask(num_latents: int, fraction: float) -> torch.Tensor | None:
    if fraction <= 0:
        return None
    mask = torch.zeros(num_latents, dtype=torch.bool)
    mask[
        torch.randperm(num_latents, generator=torch.Generator().manual_seed(0))[: int(fraction * num_latents)]
    ] = True
    return mask


def make_ours(d_in: int, num_latents: int, k: int, dead: torch.Tensor | None):
    from hf_dataselect.sae.model import TopKSAE
    from hf_dataselect.sae.train import SAETrainer, SAETrainingConfig

    sae = TopKSAE(d_in, num_latents, k, seed=0)
    trainer = SAETrainer(
        sae, SAETrainingConfig(lr_warmup_steps=1, dead_tokens_threshold=10**12), total_steps=None
    )
    if dead is not None:
        trainer.tokens_since_fired[dead] = (
            10**12
        )  # these latents count as dead; fired ones are reset each step
        original = trainer.dead_mask
        trainer.dead_mask = lambda: original() | dead

    def step(x: torch.Tensor) -> float:
        return trainer.step(x)["fvu"]

    return step


def make_sparsify(d_in: int, num_latents: int, k: int, dead: torch.Tensor | None):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(
        d_in, SparseCoderConfig(num_latents=num_latents, k=k), device="cpu", dtype=torch.float32
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (num_latents / 2**14) ** 0.5)
    state = {"step": 0}
    tokens_since_fired = torch.zeros(num_latents, dtype=torch.long)

    def step(x: torch.Tensor) -> float:
        if state["step"] == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (1 / 32) * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            did_fire = torch.zeros(num_latents, dtype=torch.bool)
            did_fire[out.latent_indices.flatten()] = True
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
        state["step"] += 1
        return float(out.fvu)

    return step


def make_naive(d_in: int, num_latents: int, k: int, dead: torch.Tensor | None):
    """A dense reference: autograd through topk and a dense code, no custom kernels."""
    generator = torch.Generator().manual_seed(0)
    bound = d_in**-0.5
    W_enc = torch.empty(num_latents, d_in).uniform_(-bound, bound, generator=generator).requires_grad_()
    b_enc = torch.zeros(num_latents, requires_grad=True)
    W_dec = torch.nn.functional.normalize(W_enc.detach().clone(), dim=1).requires_grad_()
    b_dec = torch.zeros(d_in, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=2e-4 / (num_latents / 2**14) ** 0.5)
    state = {"step": 0}
    tokens_since_fired = torch.zeros(num_latents, dtype=torch.long)

    def step(x: torch.Tensor) -> float:
        if state["step"] == 0:
            b_dec.data = x.mean(0)
        pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
        values, indices = pre.topk(k, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, indices, values)
        reconstruction = code @ W_dec + b_dec
        residual = x - reconstruction
        total = (x - x.mean(0)).pow(2).sum()
        loss = residual.pow(2).sum() / total
        fvu = loss.detach()
        if dead is not None:
            k_aux = min(d_in // 2, int(dead.sum()))
            aux_values, aux_indices = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1)
            aux_code = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
            scale = min(int(dead.sum()) / (d_in // 2), 1.0)
            loss = loss + (1 / 32) * scale * (aux_code @ W_dec - residual.detach()).pow(2).sum() / total
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True) + 1e-8)
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[indices.flatten()] = 0
        state["step"] += 1
        return float(fvu)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=["ours", "sparsify", "naive"], required=True)
    parser.add_argument("--batches", required=True, help=".npy of [steps, batch_tokens, d_in] float32")
    parser.add_argument("--latents", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = np.load(args.batches, mmap_mode="r")
    steps, batch_tokens, d_in = batches.shape
    dead = _dead_mask(args.latents, args.dead_fraction)
    make = {"ours": make_ours, "sparsify": make_sparsify, "naive": make_naive}[args.impl]
    step = make(d_in, args.latents, args.k, dead)
    fvus = []
    for i in range(args.warmup):
        fvus.append(step(torch.from_numpy(np.array(batches[i]))))
    start = time.perf_counter()
    for i in range(args.warmup, steps):
        fvus.append(step(torch.from_numpy(np.array(batches[i]))))
    elapsed = time.perf_counter() - start
    timed = steps - args.warmup
    result = {
        "impl": args.impl,
        "steps_timed": timed,
        "batch_tokens": batch_tokens,
        "d_in": d_in,
        "latents": args.latents,
        "k": args.k,
        "dead_fraction": args.dead_fraction,
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "tokens_per_s": timed * batch_tokens / elapsed,
        "fvu_first": fvus[0],
        "fvu_last": fvus[-1],
        "finite": all(math.isfinite(f) for f in fvus),
        "torch": torch.__version__,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
