"""The compiled SAE kernels (hf_dataselect/sae/native_kernels.c) against PyTorch references.

Each kernel is built twice: as the library builds it (``-march=native``: AVX-512 paths on CPUs that have it,
OpenMP threads) and for a baseline x86-64 without AVX-512 (radix selection, scalar scans, POSIX threads), so
both code paths are checked on any x86 machine.
"""

from __future__ import annotations

import logging
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.sae import kernels, native, screening

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")

PORTABLE_FLAGS = ("-O2", "-shared", "-fPIC", "-pthread") + (
    ("-march=x86-64-v2",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)


@pytest.fixture(scope="module", params=["native", "portable"])
def library(request, tmp_path_factory):
    """As built for this CPU with OpenMP, and for baseline x86-64 with POSIX threads."""
    flags = native.COMPILE_FLAGS + native.OPENMP_FLAGS if request.param == "native" else PORTABLE_FLAGS
    return native.load(native.build(flags, cache_dir=tmp_path_factory.mktemp(request.param)))


def _reference_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and columns of the k largest entries per row, ties to the smaller column (a stable sort)."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(0, 70),
    width=st.integers(1, 700),
    k=st.integers(1, 60),
    levels=st.sampled_from([2, 7, 300, 1_000_000]),
    negative=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_row_topk_is_the_stable_topk(library, rows, width, k, levels, negative, seed, dtype):
    k = min(k, width)
    generator = torch.Generator().manual_seed(seed)
    # few levels: many exact ties across the k-th value; negative values exercise the sign-flipped keys
    scores = torch.randint(0, levels, (rows, width), generator=generator).to(dtype)
    if negative:
        scores = scores - levels // 2
    scores = scores / 7  # fractions, not only integers
    values, columns = native.row_topk(scores, k, kernels=library)
    expected_values, expected_columns = _reference_topk(scores, k)
    order = columns.sort(dim=1).indices
    assert torch.equal(columns.gather(1, order), expected_columns.sort(dim=1).values)
    assert torch.equal(values.gather(1, order), scores.gather(1, columns.gather(1, order)))
    assert torch.equal(values.sort(dim=1).values, expected_values.sort(dim=1).values)


def test_row_topk_threads_and_signed_zeros_and_infinities(library):
    scores = torch.randn(1000, 6144, generator=torch.Generator().manual_seed(3))
    scores[:, :5] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-30])
    one = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native.row_topk(scores, 48, kernels=library)
        torch.set_num_threads(2)
        double = native.row_topk(scores, 48, kernels=library)
    finally:
        torch.set_num_threads(one)
    assert torch.equal(single[0], double[0]) and torch.equal(single[1], double[1])
    assert torch.equal(single[0].sort(1).values, scores.topk(48, dim=1).values.sort(1).values)


def test_row_topk_leaves_what_it_cannot_do_to_pytorch():
    assert native.row_topk(torch.zeros(3, 8, dtype=torch.float64), 2) is None
    assert native.row_topk(torch.zeros(8, 3).t(), 2) is None  # not contiguous
    assert native.row_topk(torch.zeros(3, 8), 9) is None  # k larger than a row


def test_screen_inputs_match_the_pytorch_definition(library):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(300, 70, generator=generator) * 3
    x[:100] = x[:100].bfloat16().float()  # rows a bfloat16 model produced: no rounding error
    inflate = screening.SAFETY * (1 + screening.ROUNDING_INFLATION)
    padded = native.screen_inputs(x, inflate, rows=310, columns=80, kernels=library)
    assert padded.shape == (310, 80)
    assert not padded[300:].any() and not padded[:, 73:].any()  # zero padding
    augmented = padded[:300]
    assert torch.equal(augmented[:, :70], x.bfloat16())
    assert bool((augmented[:, 70] == 1).all())
    rounded = torch.cat([x.bfloat16().double(), torch.ones(300, 1, dtype=torch.float64)], dim=1)
    exact = torch.stack([rounded.norm(dim=1), (x.double() - x.bfloat16().double()).norm(dim=1)], dim=1)
    bounds = augmented[:, 71:73].double()
    assert bool((bounds >= exact * screening.SAFETY).all())  # never below the inflated norms
    assert bool((bounds <= exact * inflate * (1 + 2.0**-7)).all())  # nor above them by more than a rounding
    assert bool((augmented[:100, 72] == 0).all())


def test_screened_topk_kernel_matches_the_pytorch_steps(library):
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(2048, 64, generator=generator) * 0.1
    bias = torch.randn(2048, generator=generator) * 0.01
    x = torch.randn(500, 64, generator=generator).bfloat16().float()
    screened = screening.ScreenedWeights(weight, bias)
    scores = screened.scores(x)
    # a margin of one candidate: close calls, so some rows cannot be proven
    compiled = native.screened_topk(scores, 17, x, None, weight, bias, 16, kernels=library)
    values, indices, proven = screening._select_and_prove(scores, 17, screened, x, 16)
    assert torch.equal(compiled[1].sort(1).values, indices.sort(1).values)
    order, expected_order = compiled[1].argsort(1), indices.argsort(1)
    assert torch.allclose(compiled[0].gather(1, order), values.gather(1, expected_order), atol=1e-5)
    assert torch.equal(compiled[2], proven)
    assert 0 < proven.float().mean() < 1  # both outcomes occur


def test_encoding_is_the_same_without_the_native_kernels(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(3000, 32, generator=generator) * 0.2
    bias = torch.randn(3000, generator=generator) * 0.01
    x = torch.randn(200, 32, generator=generator)
    with_kernels = kernels.topk_select(x, weight, bias, 20)
    monkeypatch.setenv("HF_DATASELECT_NATIVE", "off")
    assert native.library() is None
    without = kernels.topk_select(x, weight, bias, 20)
    assert torch.equal(with_kernels[1].sort(1).values, without[1].sort(1).values)
    assert torch.allclose(with_kernels[0].sort(1).values, without[0].sort(1).values, atol=1e-5)


def test_a_failed_build_falls_back_to_pytorch_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hf_dataselect.sae.native"):
            assert native.library() is None
            assert native.row_topk(torch.randn(4, 100), 3) is None
        assert "no C compiler found" in caplog.text
        values, _ = kernels.row_topk(torch.arange(12.0).view(2, 6), 2)
        assert torch.equal(values.sort(1).values, torch.tensor([[4.0, 5.0], [10.0, 11.0]]))
    finally:
        native._library.cache_clear()


def test_build_is_cached_and_atomic(tmp_path):
    first = native.build(native.COMPILE_FLAGS, cache_dir=tmp_path)
    modified = first.stat().st_mtime_ns
    assert native.build(native.COMPILE_FLAGS, cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == modified  # reused, not rebuilt
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def _encoder(latents: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(latents, d, generator=generator) * 0.1
    return weight, torch.randn(latents, generator=generator) * 0.01, torch.randn(d, generator=generator)


@pytest.mark.skipif(not native.amx_available(), reason="no AMX tiles on this CPU")
@pytest.mark.parametrize(("tokens", "latents"), [(333, 1000), (64, 2048)])
def test_amx_fused_screen_gives_the_float32_topk(tokens, latents):
    """Ragged sizes: tokens not a multiple of 32 (padded tile rows) and latents not a multiple of 32 (masked)."""
    weight, bias, shift = _encoder(latents, 72, seed=tokens)
    x = torch.randn(tokens, 72, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    screened = screening.ScreenedWeights(weight, bias, shift)
    values, indices, _ = screening.screened_topk(x, screened, 16)
    reference = kernels.pre_activations(x - shift, weight, bias).topk(16, dim=1)
    assert torch.equal(indices.sort(1).values, reference.indices.sort(1).values)
    assert torch.allclose(values.sort(1).values, reference.values.clamp_min(0).sort(1).values, atol=1e-5)
    # the same candidates and proofs as the kernel after PyTorch's bfloat16 matmul, up to the rounding of
    # its scores to bfloat16 (which the AMX path does not do, so it proves at least as many rows)
    inflate = screening.SAFETY * (1 + screening.ROUNDING_INFLATION)
    fused = native.amx_screened_topk(screened.amx_packed, 24, x, shift, weight, bias, 16, inflate)
    unfused = native.screened_topk(screened.scores(x), 24, x, shift, weight, bias, 16)
    both = fused[2] & unfused[2]
    assert bool((fused[2] | ~unfused[2]).all())
    assert torch.equal(fused[1][both].sort(1).values, unfused[1][both].sort(1).values)
    assert torch.equal(fused[0][both].sort(1).values, unfused[0][both].sort(1).values)


@pytest.mark.skipif(not native.amx_available(), reason="no AMX tiles on this CPU")
def test_amx_screen_leaves_rows_it_cannot_score_to_the_fallback():
    weight, bias, _ = _encoder(1024, 40, seed=3)
    x = torch.randn(40, 40, generator=torch.Generator().manual_seed(2))
    x[7] = float("nan")
    screened = screening.ScreenedWeights(weight, bias)
    inflate = screening.SAFETY * (1 + screening.ROUNDING_INFLATION)
    _, _, proven = native.amx_screened_topk(screened.amx_packed, 20, x, None, weight, bias, 8, inflate)
    assert not proven[7] and bool(proven[:7].all()) and bool(proven[8:].all())


@pytest.mark.parametrize("amx", [True, False])
def test_screen_gives_the_float32_topk_with_and_without_the_fused_amx_kernel(monkeypatch, amx):
    """Without AMX (or on CPUs that lack it) the screen runs PyTorch's bfloat16 matmul chunk by chunk into a reused
    buffer, then the C selection; the latents are the float32 TopK either way."""
    if amx and not native.amx_available():
        pytest.skip("no AMX tiles on this CPU")
    monkeypatch.setattr(native, "amx_available", lambda kernels=None: amx)
    weight, bias, shift = _encoder(1536, 48, seed=11)
    x = torch.randn(700, 48, generator=torch.Generator().manual_seed(4)).bfloat16().float()
    screened = screening.ScreenedWeights(weight, bias, shift)
    values, indices, _ = screening.screened_topk(x, screened, 24, chunk_tokens=256)  # 3 chunks, one partial
    reference = kernels.pre_activations(x - shift, weight, bias).topk(24, dim=1)
    assert torch.equal(indices.sort(1).values, reference.indices.sort(1).values)
    assert torch.allclose(values.sort(1).values, reference.values.clamp_min(0).sort(1).values, atol=1e-5)


@pytest.mark.parametrize("screen", ["on", "off"])
def test_bfloat16_hidden_states_encode_as_their_float32_values(monkeypatch, screen):
    """A bfloat16 model's hidden states go to the SAE as they are (no float32 copy where the screen reads them);
    the code is the one of their exact float32 widening, bit for bit."""
    from hf_dataselect.sae.model import TopKSAE

    monkeypatch.setenv("HF_DATASELECT_SAE_SCREEN", screen)
    screening.screening_available.cache_clear()
    try:
        sae = TopKSAE(40, 2048, 16)
        with torch.no_grad():
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(0))
            hidden = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
            from_bfloat16 = sae.encode(hidden)
            from_float32 = sae.encode(hidden.float())
    finally:
        screening.screening_available.cache_clear()
    assert from_bfloat16.top_values.dtype == torch.float32
    assert torch.equal(from_bfloat16.top_indices, from_float32.top_indices)
    assert torch.equal(from_bfloat16.top_values, from_float32.top_values)


def test_same_values_compares_bits():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert native.same_values(a, a.clone())  # NaN has the same bits as itself (torch.equal says no)
    assert not native.same_values(a, torch.tensor([1.0, float("nan"), -0.0]))  # -0.0 has other bits
    assert not native.same_values(a, a.double())
    assert not native.same_values(a, a[:2])
