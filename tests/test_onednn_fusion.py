"""The oneDNN Linear+GELU fusion: which modules it takes, and that the outputs do not change."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_dataselect.onednn_fusion import ENVIRONMENT_SWITCH, fuse_linear_gelu, fusion_available


def tiny_bert(hidden_act: str = "gelu", dtype: torch.dtype = torch.bfloat16) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act=hidden_act,
        max_position_embeddings=64,
    )
    return BertModel(config).eval().to(dtype)


def needs_fusion(model: torch.nn.Module) -> None:
    if not fusion_available(model):
        pytest.skip("this torch build or CPU has no oneDNN bf16 fused linear")


def test_fuses_every_intermediate_projection_without_changing_outputs():
    model = tiny_bert()
    needs_fusion(model)
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    assert fuse_linear_gelu(model) == 3
    fused_forward = model.encoder.layer[0].intermediate.forward
    with torch.inference_mode():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    # bf16 rounding only: the GELU is applied to the fp32 accumulator instead of a rounded bf16 copy
    assert torch.allclose(before, after, atol=0.1, rtol=0)
    assert (before - after).abs().mean() < 0.01
    assert model.encoder.layer[0].intermediate.forward is fused_forward


def test_fused_forward_is_not_used_while_autograd_records():
    model = tiny_bert()
    needs_fusion(model)
    fuse_linear_gelu(model)
    intermediate = model.encoder.layer[0].intermediate
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    out = intermediate(hidden)
    out.float().sum().backward()  # the fused op has no backward: the module's own forward ran
    assert hidden.grad is not None and intermediate.dense.weight.grad is not None


@pytest.mark.parametrize("hidden_act", ["relu", "gelu_new"])
def test_other_activations_are_left_alone(hidden_act):
    model = tiny_bert(hidden_act)
    needs_fusion(tiny_bert())
    assert fuse_linear_gelu(model) == 0


def test_float32_models_and_the_switch_turn_it_off(monkeypatch):
    assert fuse_linear_gelu(tiny_bert(dtype=torch.float32)) == 0
    model = tiny_bert()
    needs_fusion(model)
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "0")
    assert not fusion_available(model)
    assert fuse_linear_gelu(model) == 0
