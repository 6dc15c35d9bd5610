"""Tiny local models for tests, examples and CPU-sized recipes (no network).

``build_tiny_causal_lm`` writes a random-init Llama with a byte-level BPE tokenizer trained on the fly and a
chat template; ``build_tiny_reward_model`` writes the same architecture with a one-logit classification head.
Both save safetensors and load with the stock ``Auto*`` classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the wind.",
    "What is 12 plus 30? The answer is 42.",
    "Translate 'good morning' into French: bonjour.",
    "Summarize the following paragraph in one sentence.",
    "def add(a, b):\n    return a + b",
    "Instruction tuning data selection with sparse autoencoders and k-means clustering.",
    "Sort the numbers 5, 3, 9 and 1 in increasing order: 1, 3, 5, 9.",
]


def build_tokenizer(path: str | os.PathLike, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it (with BOS/EOS/PAD and a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else []
    tokenizer.train_from_iterator((texts or _DEFAULT_CORPUS) * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(path))
    return wrapped


def _llama_config(vocab_size: int, hidden_size: int, num_layers: int, tokenizer, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        num_key_value_heads=max(1, hidden_size // 16),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **overrides,
    )


def build_tiny_causal_lm(
    path: str | os.PathLike,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-init ``LlamaForCausalLM`` + tokenizer to ``path``; returns the folder."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path, corpus, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(len(tokenizer), hidden_size, num_layers, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_reward_model(
    path: str | os.PathLike,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-init ``LlamaForSequenceClassification`` (one logit = reward) + tokenizer to ``path``."""
    import torch
    from transformers import LlamaForSequenceClassification

    path = Path(path)
    tokenizer = build_tokenizer(path, corpus, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(
        _llama_config(len(tokenizer), hidden_size, num_layers, tokenizer, num_labels=1)
    )
    model.save_pretrained(str(path), safe_serialization=True)
    return path
