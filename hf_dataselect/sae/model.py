"""``TopKSAE``: a TopK sparse autoencoder (Gao et al. 2024), with the parameter layout of EleutherAI sparsify.

    z = topk(relu(W_enc (x - b_dec) + b_enc))        encode: the k largest activations per token
    x̂ = W_dec^T z + b_dec                             decode: a weighted sum of k unit-norm decoder rows

Parameters are stored exactly as sparsify names them (``encoder.weight [latents, d_in]``, ``encoder.bias``,
``W_dec [latents, d_in]``, ``b_dec [d_in]``, optional ``W_skip``), so a state dict is a sparsify state dict.
``W_enc`` / ``b_enc`` are aliases of ``encoder.weight`` / ``encoder.bias``.

Codes are sparse: :meth:`TopKSAE.encode` returns ``(top_values, top_indices)`` of shape ``[tokens, k]``, and
nothing of shape ``[tokens, latents]`` is kept (pre-activations are computed in chunks).

Released SAEs of other architectures load into the same class when their encoding can be reproduced exactly:
JumpReLU (``activation="jumprelu"`` with a per-latent ``threshold``) and plain ReLU SAEs; their codes have a
variable number of active latents, padded with zeros to the largest count in the batch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn

from hf_dataselect.errors import InputError
from hf_dataselect.sae import kernels

ACTIVATIONS = ("topk", "jumprelu", "relu")
INPUT_NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEConfig:
    """Shape and encoding rule of an SAE (what ``cfg.json`` describes)."""

    d_in: int
    """Width of the activations the SAE reads (the model's hidden size for residual-stream hookpoints)."""
    num_latents: int
    """Number of latents (dictionary size)."""
    k: int | None = 32
    """Active latents per token for ``activation="topk"``; ``None`` for JumpReLU / ReLU SAEs."""
    activation: str = "topk"
    """``"topk"``; ``"jumprelu"`` or ``"relu"`` for SAEs loaded from SAELens."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during training (and project their gradients)."""
    skip_connection: bool = False
    """sparsify's optional linear skip connection ``W_skip`` (reconstruction only)."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (always true for sparsify and our SAEs)."""
    input_normalization: str = "none"
    """SAELens per-token input normalisation: ``"none"``, ``"constant_norm_rescale"`` or ``"layer_norm"``."""
    multi_topk: bool = False
    """Recorded from sparsify configs; training option only, encoding is unaffected."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise InputError(f"Unknown SAE activation {self.activation!r}; supported: {list(ACTIVATIONS)}.")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise InputError(
                f"Unknown input normalisation {self.input_normalization!r}; supported: "
                f"{list(INPUT_NORMALIZATIONS)}."
            )
        if self.d_in < 1 or self.num_latents < 1:
            raise InputError(f"d_in and num_latents must be ≥ 1, got {self.d_in} and {self.num_latents}.")
        if self.activation == "topk":
            if self.k is None or not 1 <= self.k <= self.num_latents:
                raise InputError(f"k must be in 1..num_latents={self.num_latents}, got {self.k}.")
        else:
            self.k = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class SparseCode(NamedTuple):
    """A sparse code: the active latents of each token."""

    top_values: torch.Tensor
    """``[..., k]`` activations (≥ 0; zeros are padding / inactive)."""
    top_indices: torch.Tensor
    """``[..., k]`` latent ids (int64)."""


class SAEOutput(NamedTuple):
    """What :meth:`TopKSAE.forward` returns."""

    reconstruction: torch.Tensor
    top_values: torch.Tensor
    top_indices: torch.Tensor
    fvu: torch.Tensor
    """Fraction of variance unexplained: ``||x - x̂||² / ||x - mean(x)||²`` over the batch."""
    auxk_loss: torch.Tensor
    """AuxK loss (Gao et al. 2024): dead latents reconstruct the residual; 0 when no latent is dead."""


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder (see the module docstring).

    ``metadata`` holds what is known about how the SAE was made (base model, hookpoint, training tokens,
    metrics...); it is saved next to the weights and rendered in the model card.
    """

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int | None = 32,
        *,
        activation: str = "topk",
        normalize_decoder: bool = True,
        skip_connection: bool = False,
        apply_b_dec_to_input: bool = True,
        input_normalization: str = "none",
        multi_topk: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = 0,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = SAEConfig(
            d_in=d_in,
            num_latents=num_latents,
            k=k,
            activation=activation,
            normalize_decoder=normalize_decoder,
            skip_connection=skip_connection,
            apply_b_dec_to_input=apply_b_dec_to_input,
            input_normalization=input_normalization,
            multi_topk=multi_topk,
        )
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.encoder = nn.Linear(d_in, num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(num_latents, d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.W_skip = (
            nn.Parameter(torch.zeros(d_in, d_in, device=device, dtype=dtype)) if skip_connection else None
        )
        if activation == "jumprelu":
            self.register_buffer("threshold", torch.zeros(num_latents, device=device, dtype=dtype))
        else:
            self.threshold = None
        self.reset_parameters(seed)

    @classmethod
    def from_config(cls, cfg: SAEConfig, **kwargs: Any) -> TopKSAE:
        return cls(**cfg.to_dict(), **kwargs)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """sparsify's initialisation: a uniform ``±1/sqrt(d_in)`` encoder, decoder = normalised encoder rows."""
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        bound = self.d_in**-0.5
        weight = torch.empty(self.num_latents, self.d_in).uniform_(-bound, bound, generator=generator)
        self.encoder.weight.copy_(weight)
        self.encoder.bias.zero_()
        self.W_dec.copy_(weight)
        if self.cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # -- shape and aliases --------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def W_enc(self) -> nn.Parameter:
        """Encoder weight ``[latents, d_in]`` (sparsify's ``encoder.weight``; SAELens stores its transpose)."""
        return self.encoder.weight

    @property
    def b_enc(self) -> nn.Parameter:
        return self.encoder.bias

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    @property
    def hookpoint(self) -> str | None:
        """The hookpoint the SAE was trained on, when known."""
        return self.metadata.get("hookpoint")

    # -- encoding -----------------------------------------------------------------------------------------
    def _normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.cfg.input_normalization
        if mode == "constant_norm_rescale":
            scale = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * scale, scale
        if mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            centered = x - mean
            std = centered.std(dim=-1, keepdim=True)
            return centered / (std + 1e-5), (mean, std)
        return x, None

    def _denormalize_output(self, y: torch.Tensor, stats: Any) -> torch.Tensor:
        mode = self.cfg.input_normalization
        if mode == "constant_norm_rescale":
            return y / stats
        if mode == "layer_norm":
            mean, std = stats
            return y * std + mean
        return y

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def _encode_prepared(self, x: torch.Tensor, chunk_tokens: int | None) -> SparseCode:
        if self.cfg.activation == "topk":
            assert self.cfg.k is not None
            values, indices = kernels.topk_encode(x, self.W_enc, self.b_enc, self.cfg.k, chunk_tokens)
        else:
            values, indices = kernels.threshold_select(
                x, self.W_enc, self.b_enc, self.threshold, chunk_tokens
            )
        return SparseCode(values, indices)

    def encode(self, x: torch.Tensor, *, chunk_tokens: int | None = None) -> SparseCode:
        """Active latents of every token of ``x [..., d_in]``: ``(top_values, top_indices)``, each ``[..., k]``.

        TopK: ``topk(relu(W_enc (x - b_dec) + b_enc))``. Pre-activations are computed ``chunk_tokens`` tokens
        at a time (default: about 16M values per chunk) and only the selected entries are kept.
        """
        self._check_width(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        parameters = (self.W_enc, self.b_enc, self.b_dec)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (flat, *parameters))
        # a bfloat16 model's hidden states widen exactly to float32: the TopK kernels take them as they are
        # (the bfloat16 screen then needs no float32 copy)
        reads_bfloat16 = (
            flat.dtype == torch.bfloat16
            and self.dtype == torch.float32
            and self.cfg.input_normalization is None
            and self.cfg.activation == "topk"
            and not needs_grad
        )
        normalized, _ = self._normalize_input(flat if reads_bfloat16 else flat.to(self.dtype))
        if self.cfg.activation == "topk" and not needs_grad:
            # inference: b_dec goes to the kernel unsubtracted, so a bfloat16 screen sees exact inputs
            shift = self.b_dec if self.cfg.apply_b_dec_to_input else None
            assert self.cfg.k is not None
            values, indices = kernels.topk_select(
                normalized, self.W_enc, self.b_enc, self.cfg.k, chunk_tokens, shift=shift
            )
            code = SparseCode(values, indices)
        else:
            code = self._encode_prepared(self._encoder_input(normalized), chunk_tokens)
        return SparseCode(code.top_values.reshape(*lead, -1), code.top_indices.reshape(*lead, -1))

    def decode(self, top_values: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """``sum_j top_values[..., j] * W_dec[top_indices[..., j]] + b_dec`` -> ``[..., d_in]``."""
        lead = top_indices.shape[:-1]
        flat_indices = top_indices.reshape(-1, top_indices.shape[-1])
        flat_values = top_values.reshape(-1, top_values.shape[-1]).to(self.dtype)
        out = kernels.sparse_decode(flat_indices, flat_values, self.W_dec) + self.b_dec
        return out.reshape(*lead, self.d_in)

    def dense_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The code as a dense ``[..., latents]`` tensor (for inspection and small inputs only)."""
        values, indices = self.encode(x)
        dense = torch.zeros(*values.shape[:-1], self.num_latents, dtype=values.dtype, device=values.device)
        return dense.scatter_add_(-1, indices, values)  # padding entries are zeros whose index may repeat

    def forward(
        self,
        x: torch.Tensor,
        *,
        dead_mask: torch.Tensor | None = None,
        chunk_tokens: int | None = None,
    ) -> SAEOutput:
        """Reconstruct ``x [tokens, d_in]`` and compute the training losses.

        ``dead_mask [latents]`` (bool) switches on the AuxK loss: the top ``d_in // 2`` dead latents (by
        pre-activation) reconstruct the residual ``x - x̂``, scaled down when fewer latents are dead (as in
        Gao et al. 2024, appendix B.1, and sparsify). Gradients of AuxK reach the dead latents' encoder and
        decoder rows, which is what revives them.
        """
        self._check_width(x)
        if x.dim() != 2:
            x = x.reshape(-1, self.d_in)
        x = x.to(self.dtype)
        normalized, stats = self._normalize_input(x)
        encoder_input = self._encoder_input(normalized)
        values, indices = self._encode_prepared(encoder_input, chunk_tokens)
        reconstruction = kernels.sparse_decode(indices, values, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            reconstruction = reconstruction + normalized @ self.W_skip.t()
        residual = normalized - reconstruction
        total_variance = (normalized - normalized.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        fvu = residual.pow(2).sum() / total_variance
        auxk_loss = self._auxk_loss(encoder_input, residual, total_variance, dead_mask, chunk_tokens)
        return SAEOutput(self._denormalize_output(reconstruction, stats), values, indices, fvu, auxk_loss)

    def _auxk_loss(
        self,
        encoder_input: torch.Tensor,
        residual: torch.Tensor,
        total_variance: torch.Tensor,
        dead_mask: torch.Tensor | None,
        chunk_tokens: int | None,
    ) -> torch.Tensor:
        if dead_mask is None or self.cfg.activation != "topk":
            return residual.new_zeros(())
        dead = dead_mask.nonzero().squeeze(-1)
        if dead.numel() == 0:
            return residual.new_zeros(())
        k_aux_full = max(1, self.d_in // 2)
        scale = min(dead.numel() / k_aux_full, 1.0)
        k_aux = min(k_aux_full, dead.numel())
        values, sub_indices = kernels.topk_encode(
            encoder_input, self.W_enc[dead], self.b_enc[dead], k_aux, chunk_tokens
        )
        estimate = kernels.sparse_decode(dead[sub_indices], values, self.W_dec)
        return scale * (estimate - residual.detach()).pow(2).sum() / total_variance

    # -- decoder constraints (training) ---------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the plane orthogonal to the row (rows are unit norm)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(
                f"The SAE reads {self.d_in}-dimensional activations but got width {x.shape[-1]}; "
                "use the SAE with the model and hookpoint it was trained on."
            )

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"d_in={self.d_in}, num_latents={self.num_latents}{k}, activation={self.cfg.activation}"

    # -- files and the Hub ------------------------------------------------------------------------------------
    def save_pretrained(
        self, folder: str | os.PathLike, *, hookpoint: str | None = None, model_card: bool = True
    ) -> str:
        """Write ``folder/<hookpoint>/{cfg.json, sae.safetensors, hf_dataselect.json}`` and a ``README.md``.

        The layout is EleutherAI sparsify's (its loader reads it); see :mod:`hf_dataselect.sae.io`.
        Returns the hookpoint folder.
        """
        from hf_dataselect.sae.io import save_sae

        return str(save_sae(self, folder, hookpoint=hookpoint, model_card=model_card))

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | os.PathLike,
        hookpoint: str | int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> TopKSAE:
        """Load an SAE from a local folder or a Hub repo (only that hookpoint's files are downloaded).

        Reads our format, EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``) and SAELens
        (``cfg.json`` + ``sae_weights.safetensors``; TopK, JumpReLU and ReLU). Safetensors only.
        """
        from hf_dataselect.sae.io import load_sae

        return load_sae(repo_or_path, hookpoint, device=device, dtype=dtype, revision=revision, token=token)

    def push_to_hub(self, repo_id: str, *, hookpoint: str | None = None, **kwargs: Any) -> str:
        """Upload this SAE (one hookpoint folder + model card) to ``repo_id``; see :func:`hub.push_to_hub`."""
        from hf_dataselect.sae.hub import push_to_hub

        name = hookpoint or self.hookpoint
        if not name:
            raise InputError("push_to_hub needs hookpoint= (the SAE's metadata does not name one).")
        return push_to_hub(repo_id, {name: self}, **kwargs)
