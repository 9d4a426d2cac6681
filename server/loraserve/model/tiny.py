"""Tiny random-weight causal LMs with a locally trained tokenizer, written as real HF directories.

Tests and benchmarks use these: nothing is downloaded, and the directory goes through the same
loading code as a user's model. Shapes respect the bitsandbytes CPU constraint (quantized
in-features a multiple of 64, out-features of 32).

Knows nothing about serving: it only writes config, safetensors weights and a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")

CORPUS = [
    "LoRA adapts a frozen base model by adding a low-rank update B A to chosen projections.",
    "QLoRA stores the base weights in 4-bit NormalFloat and trains adapters in higher precision.",
    "A server holds one quantized base model and many small adapters, chosen per request.",
    "Continuous batching lets new requests join at step boundaries while others decode.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > .,;:!?",
    "Café, naïve, façade, jalapeño, Straße, Ærø, Øresund, ĳssel; Привет мир; γειά σου κόσμε.",
    "多语言文本：你好，世界。日本語のテキスト、こんにちは。한국어 안녕하세요.",
    "Emoji: 🙂 🚀 🌍 👩‍💻 ✨ 🎉 — and symbols: © ® ™ € £ ¥ §.",
    "def forward(self, x):\n    return self.base(x) + self.scale * (x @ self.a) @ self.b\n",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small built-in corpus: encodes any UTF-8 text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.1,
    seed: int = 0,
    weights_dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    **config_overrides,
) -> Path:
    """Write a random `arch` model ("llama", "mistral", "qwen2", "gemma2", ...) and tokenizer to
    `path`, its weights stored as `weights_dtype` (published checkpoints mostly store bf16), its
    output projection tied to the input embedding if `tie_word_embeddings`; `config_overrides`
    are further keywords of the architecture's config."""
    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = AutoConfig.for_model(
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(weights_dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
