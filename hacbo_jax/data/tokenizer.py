"""Small byte-level BPE tokenizer with one token per digit, saved as a Hugging Face fast tokenizer.

Digits are split individually before BPE merges (``pre_tokenizers.Digits(individual_digits=True)``)
so every number is spelled digit by digit: a tiny model then learns arithmetic on a 10-symbol
alphabet instead of on thousands of multi-digit tokens. Byte-level BPE means no input is ever
out of vocabulary. The result is a ``transformers.PreTrainedTokenizerFast`` whose
``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json``, loadable with
``transformers.AutoTokenizer.from_pretrained(directory)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def _import_transformers_quietly():
    """transformers, imported without its advice that PyTorch is missing: the tokenizers and
    configs used here need no PyTorch, and a run should print only its own lines."""
    previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        import transformers
    finally:
        if previous is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
    return transformers


def __getattr__(name: str) -> Any:
    """``AutoTokenizer`` and ``PreTrainedTokenizerFast``, imported from transformers on first
    use: the config checks that only look at tokenizer files (which directory, whether it has
    one) refuse bad input in a second instead of after transformers' import."""
    if name in ("AutoTokenizer", "PreTrainedTokenizerFast"):
        return getattr(_import_transformers_quietly(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
# Order fixes the ids: pad = 0, eos = 1, bos = 2.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN)
DEFAULT_VOCAB_SIZE = 1024


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> "PreTrainedTokenizerFast":
    """Trains a byte-level BPE with individually split digits on ``texts``.

    Args:
      texts: training corpus, one document per item (iterated once, in order; the BPE trainer
        is deterministic for a fixed corpus order).
      vocab_size: final vocabulary size including the 256 byte symbols and the special tokens.
      min_frequency: pairs seen fewer times are never merged.

    Returns:
      A fast tokenizer with ``pad_token`` (id 0), ``eos_token`` (id 1) and ``bos_token`` (id 2).
      It adds no special tokens by itself; callers append EOS where a document ends.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    PreTrainedTokenizerFast = _import_transformers_quietly().PreTrainedTokenizerFast
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", directory: str | Path) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (+ special-token map) to ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> "PreTrainedTokenizerFast":
    """Loads a tokenizer saved by :func:`save_tokenizer` (or any HF fast tokenizer directory)."""

    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}; expected a Hugging Face tokenizer directory"
        )
    return _import_transformers_quietly().AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------- which tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer (``tokenizer.json`` or
    ``tokenizer_config.json``)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


# Tokens of the shipped Qwen3 tokenizer (151,643 regular + 26 added); Qwen3's embedding has more.
QWEN3_TOKENIZER_SIZE = 151_669


def shipped_qwen3_tokenizer() -> Path:
    """The bundled Qwen3 tokenizer (``hacbo_jax/assets/qwen3-tokenizer``)."""
    from hacbo_jax.assets import ASSETS_DIR

    return ASSETS_DIR / "qwen3-tokenizer"


def default_tokenizer(model_path: str | Path) -> str:
    """The tokenizer a model uses when ``model.tokenizer`` is null.

    A local model directory with tokenizer files: that directory. One without, whose
    ``config.json`` says ``model_type: qwen3`` and whose ``vocab_size`` holds every Qwen3 token:
    the shipped Qwen3 tokenizer (every Qwen3 size shares it). A hub id: the hub id (read from the local Hugging Face cache). Otherwise
    ValueError naming the directory and the fix (set ``model.tokenizer``).
    """
    import json

    path = Path(model_path).expanduser()
    if not path.is_dir():
        return str(model_path)
    if has_tokenizer(path):
        return str(path)
    config_file = path / "config.json"
    model_type, vocab_size = None, None
    if config_file.is_file():
        try:
            hf_config = json.loads(config_file.read_text())
            model_type, vocab_size = hf_config.get("model_type"), hf_config.get("vocab_size")
        except (json.JSONDecodeError, AttributeError):
            model_type = None
    if model_type == "qwen3":
        # Only a model whose embedding holds every Qwen3 token can use the Qwen3 tokenizer (a
        # small model trained with its own tokenizer, that lost its files, cannot).
        if isinstance(vocab_size, int) and vocab_size >= QWEN3_TOKENIZER_SIZE:
            return str(shipped_qwen3_tokenizer())
        raise ValueError(
            f"model directory {path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}) and its "
            f"vocab_size {vocab_size!r} is smaller than the shipped Qwen3 tokenizer's "
            f"{QWEN3_TOKENIZER_SIZE} tokens, so it was trained with another tokenizer; put that "
            "tokenizer's files in the model directory or set model.tokenizer"
        )
    raise ValueError(
        f"model directory {path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}) and its "
        f"model_type is {model_type!r}, not 'qwen3' (whose shipped tokenizer would be used); "
        "set model.tokenizer to a tokenizer directory or hub id"
    )
