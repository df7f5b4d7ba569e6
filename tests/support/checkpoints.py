"""Builds a tiny Qwen3 checkpoint + tokenizer directory in Hugging Face format, for tests."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.data.gsm8k import format_prompt, format_target
from hacbo_jax.data.synthetic import SyntheticTask
from hacbo_jax.data.tokenizer import save_tokenizer, train_tokenizer


def make_tiny_checkpoint(
    directory: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0
) -> Path:
    """A random 2-layer Qwen3 with a 320-token BPE trained on synthetic problems."""
    examples = SyntheticTask("arith-small", seed=123).examples("train", 300)
    tokenizer = train_tokenizer(
        (format_prompt(e.question) + format_target(e.answer) for e in examples), vocab_size=320
    )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config, rngs=nnx.Rngs(seed)).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return Path(directory)
