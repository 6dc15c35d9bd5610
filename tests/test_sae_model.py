"""TopKSAE against naive dense reference computations: codes, reconstructions, losses and gradients."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.sae import kernels
from hf_dataselect.sae.model import TopKSAE


def _random_sae(d_in=16, num_latents=64, k=4, seed=0, **kwargs) -> TopKSAE:
    sae = TopKSAE(d_in, num_latents, k, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=generator) * 0.3)
        sae.encoder.bias.copy_(torch.randn(num_latents, generator=generator) * 0.1)
    return sae


def _dense_code(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """z = topk(relu(W_enc (x - b_dec) + b_enc)) as a dense [tokens, latents] matrix."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def test_encode_and_decode_match_a_dense_reference():
    sae = _random_sae()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (50, 4)
    assert indices.dtype == torch.long
    dense = _dense_code(sae, x)
    assert torch.allclose(torch.zeros_like(dense).scatter(-1, indices, values), dense, atol=1e-6)
    assert torch.allclose(sae.dense_activations(x), dense, atol=1e-6)
    assert torch.allclose(sae.decode(values, indices), dense @ sae.W_dec + sae.b_dec, atol=1e-5)
    # leading dimensions are kept
    values3, indices3 = sae.encode(x.reshape(5, 10, 16))
    assert values3.shape == (5, 10, 4)
    assert torch.equal(indices3.reshape(50, 4), indices)


def test_encoding_is_chunked_and_never_builds_more_than_a_chunk(monkeypatch):
    sae = _random_sae()
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(4))
    reference = sae.encode(x)
    seen_rows: list[int] = []
    original = kernels.pre_activations

    def spy(chunk, weight, bias, out=None):
        seen_rows.append(chunk.shape[0])
        return original(chunk, weight, bias, out=out)

    monkeypatch.setattr(kernels, "pre_activations", spy)
    values, indices = sae.encode(x, chunk_tokens=8)
    assert max(seen_rows) == 8 and sum(seen_rows) == 37
    assert torch.allclose(values, reference.top_values, atol=1e-6)
    assert torch.equal(indices, reference.top_indices)


def _dense_losses(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor):
    """FVU + AuxK computed densely with plain autograd (the reference for the sparse kernels)."""
    encoder_input = x - sae.b_dec
    pre = encoder_input @ sae.W_enc.T + sae.b_enc
    values, indices = pre.topk(sae.k)
    z = torch.zeros_like(pre).scatter(1, indices, values.relu())
    reconstruction = z @ sae.W_dec + sae.b_dec
    residual = x - reconstruction
    total = (x - x.mean(0)).pow(2).sum()
    fvu = residual.pow(2).sum() / total
    dead_ids = dead.nonzero().squeeze(-1)
    k_aux = min(sae.d_in // 2, dead_ids.numel())
    scale = min(dead_ids.numel() / (sae.d_in // 2), 1.0)
    aux_values, aux_sub = pre[:, dead_ids].topk(k_aux)
    z_aux = torch.zeros_like(pre).scatter(1, dead_ids[aux_sub], aux_values.relu())
    auxk = scale * (z_aux @ sae.W_dec - residual.detach()).pow(2).sum() / total
    return fvu, auxk


@pytest.mark.parametrize("dead_share", [0.05, 0.5])
def test_forward_losses_and_gradients_match_dense_autograd(dead_share):
    sae = _random_sae()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    dead = torch.rand(64, generator=torch.Generator().manual_seed(6)) < dead_share
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    fvu, auxk = _dense_losses(sae, x, dead)
    (fvu + auxk).backward()
    assert torch.allclose(out.fvu, fvu, atol=1e-6) and torch.allclose(out.auxk_loss, auxk, atol=1e-6)
    assert out.auxk_loss > 0
    for name, parameter in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], parameter.grad, atol=1e-5), name


def test_no_dead_latents_means_zero_auxk_and_reconstruction_is_decode():
    sae = _random_sae()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(7))
    out = sae(x, dead_mask=torch.zeros(64, dtype=torch.bool))
    assert float(out.auxk_loss) == 0.0
    assert torch.allclose(out.reconstruction, sae.decode(out.top_values, out.top_indices))


def test_decoder_rows_are_unit_norm_and_gradient_projection_removes_the_parallel_part():
    sae = _random_sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    sae.W_dec.grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(8))
    sae.remove_gradient_parallel_to_decoder_directions()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), atol=1e-5)


def test_other_dtypes_work():
    sae = _random_sae().to(torch.float64)
    x = torch.randn(10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(sae.dense_activations(x), _dense_code(sae, x))
    half = _random_sae().to(torch.bfloat16)
    values, _ = half.encode(x.float())
    assert values.dtype == torch.bfloat16
    out = half(x.to(torch.bfloat16), dead_mask=torch.ones(64, dtype=torch.bool))
    (out.fvu + out.auxk_loss).backward()
    assert half.W_dec.grad.dtype == torch.bfloat16 and torch.isfinite(half.W_dec.grad.float()).all()


def test_jumprelu_and_relu_encodings_match_their_definitions():
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(10))
    jump = _random_sae(k=None, activation="jumprelu")
    with torch.no_grad():
        jump.threshold.copy_(torch.rand(64, generator=torch.Generator().manual_seed(11)) * 0.3)
    pre = (x - jump.b_dec) @ jump.W_enc.T + jump.b_enc
    expected = torch.where(pre > jump.threshold, pre, torch.zeros(()))
    values, indices = jump.encode(x, chunk_tokens=7)
    assert values.shape[1] == int((pre > jump.threshold).sum(1).max())  # padded to the widest token
    assert torch.allclose(torch.zeros_like(pre).scatter_add(1, indices, values), expected, atol=1e-6)
    assert torch.allclose(jump.decode(values, indices), expected @ jump.W_dec + jump.b_dec, atol=1e-5)
    relu = _random_sae(k=None, activation="relu")
    pre = (x - relu.b_dec) @ relu.W_enc.T + relu.b_enc
    assert torch.allclose(relu.dense_activations(x), pre.relu(), atol=1e-6)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_input_normalisation_is_applied_before_encoding(mode):
    sae = _random_sae(input_normalization=mode)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(12)) * 5 + 2
    if mode == "constant_norm_rescale":
        normalized = x * 16**0.5 / x.norm(dim=-1, keepdim=True)
    else:
        centered = x - x.mean(-1, keepdim=True)
        normalized = centered / (centered.std(-1, keepdim=True) + 1e-5)
    assert torch.allclose(sae.dense_activations(x), _dense_code(sae, normalized), atol=1e-5)


def test_bad_shapes_and_options_are_input_errors():
    sae = _random_sae()
    with pytest.raises(InputError, match="reads 16-dimensional activations but got width 8"):
        sae.encode(torch.randn(3, 8))
    with pytest.raises(InputError, match=r"k must be in 1\.\.num_latents"):
        TopKSAE(16, 8, 9)
    with pytest.raises(InputError, match="Unknown SAE activation"):
        TopKSAE(16, 8, 2, activation="gated")


@pytest.fixture
def screen_setting(monkeypatch):
    """Set ``HF_DATASELECT_SAE_SCREEN`` for one test (the availability check is cached per process)."""
    from hf_dataselect.sae import screening

    def set_to(value: str) -> None:
        monkeypatch.setenv("HF_DATASELECT_SAE_SCREEN", value)
        screening.screening_available.cache_clear()

    yield set_to
    screening.screening_available.cache_clear()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    width_log2=st.integers(4, 10),
    k=st.integers(1, 24),
    levels=st.sampled_from([3, 50, 100_000]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_row_topk_gives_torch_topk_values_ties_included(rows, width_log2, k, levels, seed, dtype):
    width = 2**width_log2
    k = min(k, width)
    generator = torch.Generator().manual_seed(seed)
    # few distinct levels -> many exact ties, the case where the grouped selection could go wrong
    scores = torch.randint(0, levels, (rows, width), generator=generator).to(dtype)
    with mock.patch.dict(
        os.environ, {"HF_DATASELECT_NATIVE": "off"}
    ):  # the PyTorch path (tests/test_sae_native.py)
        values, columns = kernels.row_topk(scores, k)
    reference = scores.topk(k, dim=-1).values
    assert torch.equal(values.sort(dim=1).values, reference.sort(dim=1).values)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(row.tolist())) == k for row in columns)  # distinct columns


def test_row_topk_uses_groups_only_where_they_pay():
    assert kernels._group_count(6144, 32) == 16
    assert kernels._group_count(131072, 128) == 32
    assert kernels._group_count(100, 8) == 0  # not divisible into enough groups: plain torch.topk
    assert kernels._group_count(64, 32) == 0


def test_bfloat16_screen_returns_the_float32_topk_and_proves_it_or_recomputes():
    from hf_dataselect.sae import screening

    generator = torch.Generator().manual_seed(13)
    x = torch.randn(300, 64, generator=generator)
    weight = torch.randn(1024, 64, generator=generator) * 0.1
    # latents 0..39: near-copies of one direction (differences far below bfloat16 resolution), and the first
    # 50 tokens point along it, so their top-8 is decided by these near-ties
    weight[:40] = weight[0] + 1e-3 * torch.randn(40, 64, generator=generator)
    x[:50] += 8 * weight[0] / weight[0].norm()
    bias = torch.randn(1024, generator=generator) * 0.01
    screened = screening.ScreenedWeights(weight, bias)
    values, indices, recomputed = screening.screened_topk(x, screened, 8)
    pre = torch.addmm(bias, x, weight.t())
    reference = pre.topk(8, dim=-1)
    assert torch.equal(indices.sort(1).values, reference.indices.sort(1).values)
    assert torch.allclose(values.sort(1).values, reference.values.clamp_min(0).sort(1).values, atol=1e-5)
    # the near-tied tokens could not be proven and were recomputed; the others were proven
    assert 40 <= recomputed <= 60


def _screen_slack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``c + u/(1-u)|c| - p`` for every (token, latent): the screen's upper bound minus the exact value."""
    from hf_dataselect.sae import screening

    scores = screening.ScreenedWeights(weight, bias).scores(x)
    return screening.upper_bound(scores) - torch.addmm(bias.double(), x.double(), weight.double().t())


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_screen_scores_bound_every_entry_and_not_loosely(input_dtype):
    from hf_dataselect.sae import screening

    generator = torch.Generator().manual_seed(21)
    weight = torch.randn(2048, 96, generator=generator) * 0.07
    weight[:8] *= 30  # a few latents with large norms must not loosen the bound of the others
    bias = torch.randn(2048, generator=generator) * 0.05
    # float32 inputs are rounded by the screen; inputs that are already bfloat16 values (a bf16 model's hidden
    # states) are not, and their bound is smaller
    x = (torch.randn(400, 96, generator=generator) * 3).to(input_dtype).float()
    slack = _screen_slack(x, weight, bias)
    assert bool((slack >= 0).all())  # an upper bound, for every token and latent
    u = screening.UNIT_ROUNDOFF
    scale = (
        torch.cat([weight, bias[:, None]], 1).double().norm(dim=1)[None, :]
        * (x.double().norm(dim=1) + 1)[:, None]
    )
    assert bool((slack <= 6 * u * scale).all())  # and a tight one: a few roundoffs of that latent's own norm
    if input_dtype == torch.bfloat16:
        assert slack.mean() < _screen_slack(x + 1e-3, weight, bias).mean()


@pytest.mark.parametrize("grad", [False, True])
def test_screened_encoding_equals_the_plain_float32_encoding(screen_setting, grad):
    sae = _random_sae(d_in=48, num_latents=2048, k=16)
    # hidden states of a bfloat16 model: exact in bfloat16 (b_dec is folded into the screen's bias without grad)
    x = torch.randn(700, 48, generator=torch.Generator().manual_seed(8)).bfloat16().float()
    with torch.set_grad_enabled(grad):
        screen_setting("off")
        plain = sae.encode(x)
        screen_setting("on")
        kernels.SCREEN_STATS.update(rows=0, recomputed=0)
        screened = sae.encode(x)
    assert kernels.SCREEN_STATS["rows"] == 700
    assert torch.equal(screened.top_indices.sort(1).values, plain.top_indices.sort(1).values)
    assert torch.allclose(screened.top_values.sort(1).values, plain.top_values.sort(1).values, atol=1e-5)
    dense = _dense_code(sae, x)
    assert torch.allclose(
        torch.zeros_like(dense).scatter(-1, screened.top_indices, screened.top_values), dense, atol=1e-5
    )


def test_screen_setting_and_cpu_decide_where_it_runs(screen_setting, monkeypatch):
    from hf_dataselect.sae import screening

    x, weight = torch.zeros(4, 8), torch.zeros(2048, 8)
    screen_setting("off")
    assert not screening.use_screening(x, weight, 32)
    screen_setting("on")
    assert screening.use_screening(x, weight, 32)
    assert not screening.use_screening(x.double(), weight, 32)  # float32 inputs only
    assert not screening.use_screening(x, torch.zeros(512, 8), 32)  # too narrow to pay
    for has_amx in (False, True):
        monkeypatch.setattr(screening, "_cpu_has_amx", lambda has_amx=has_amx: has_amx)
        screen_setting("auto")
        assert screening.use_screening(x, weight, 32) is has_amx


def test_screen_sees_weights_that_a_fused_optimizer_changed_in_place(screen_setting):
    """Fused Adam updates parameters without bumping their version counters; the screen's cached bfloat16
    weights must notice (regression: SAE training on AMX CPUs screened with the weights of its first step)."""
    screen_setting("on")
    sae = _random_sae(d_in=32, num_latents=2048, k=16)
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(6))
    optimizer = torch.optim.Adam(sae.parameters(), lr=5.0, fused=True)
    with torch.no_grad():
        before = sae.encode(x)  # caches the screen's weights
    # raise the bias of 8 latents that no token selected: they now top every token, outside the stale
    # candidates, while the stale bound still "proves" the old selection
    unused = torch.ones(2048, dtype=torch.bool)
    unused[before.top_indices.unique()] = False
    raised = unused.nonzero().squeeze(-1)[:8]
    (-sae.b_enc[raised].sum()).backward()
    version = sae.b_enc._version
    optimizer.step()
    assert sae.b_enc._version == version  # the counter did not move: only the values tell
    with torch.no_grad():
        after = sae.encode(x)
    assert set(raised.tolist()) <= set(after.top_indices[0].tolist())
    dense = _dense_code(sae, x)
    assert torch.allclose(
        torch.zeros_like(dense).scatter(-1, after.top_indices, after.top_values), dense, atol=1e-5
    )
