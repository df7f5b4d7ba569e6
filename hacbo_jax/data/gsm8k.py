"""GSM8K for supervised fine-tuning: loading, preprocessing, tokenisation, fixed-shape batches.

Prompt format (the one place it is defined; training and evaluation both use it)::

    prompt = "Question: {question}\\nAnswer:"
    target = " {answer}" + EOS

Preprocessing (the paper's "whitespace and commas stripped", made precise): surrounding
whitespace of the question and answer is stripped, trailing whitespace of each line is
stripped, and thousands-separator commas inside numbers are removed (``1,000`` -> ``1000``).
Other commas (prose) are kept, since removing them would damage the text without helping the
answer extraction (exact match ignores commas anyway).

Training batches are RIGHT-padded to a fixed length ``max_len``::

    input_ids      int32[N, L]  prompt tokens, answer tokens, EOS, then pad
    attention_mask int32[N, L]  1 on real tokens
    targets        int32[N, L]  targets[:, t] = input_ids[:, t + 1] (pad at the last column)
    loss_mask      float32[N, L] 1 where targets[:, t] is an answer token (answer or its EOS)

so the loss is next-token cross-entropy ``sum(loss_mask * CE(logits, targets)) / sum(loss_mask)``:
prompt tokens are never predicted. Other data formats (:mod:`hacbo_jax.data.formats`) give
an :class:`Example` its training text as ``(text, trained)`` segments, each tokenised on its own
and concatenated; loss_mask is 1 where the target is a token of a trained segment (or the
appended EOS), and the evaluation prompt is the segments before the last trained one. Sequences longer than ``max_len`` are cut at the end (the
tail of the answer and its EOS are lost) and counted in ``num_truncated``.

Generation batches are LEFT-padded prompts of a fixed length (``PromptBatch``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hacbo_jax.assets import ASSETS_DIR

DEFAULT_DATA_DIR = ASSETS_DIR / "gsm8k"
SPLITS = ("train", "test")
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_MAX_LEN = 512
# Default held-out slice of the train split (micro-dev pool, never trained on): 7,473 - 1,473
# leaves exactly 6,000 training examples.
DEFAULT_HOLDOUT_SIZE = 1473
DEFAULT_HOLDOUT_SEED = 0

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TRAILING_SPACE = re.compile(r"[ \t\r\f\v]+(?=\n)")


Segment = tuple[str, bool]
"""A piece of training text and whether its tokens are predicted (loss_mask 1)."""


class Example(NamedTuple):
    """One training / evaluation example.

    ``question`` / ``answer``: for GSM8K the question and the worked solution ending in
    ``#### n``; for the other data formats (:mod:`hacbo_jax.data.formats`) the user's last
    request and the reference the metric compares with. ``segments`` is the training text as
    ``(text, trained)`` pieces; empty means the question_answer layout
    ``((format_prompt(question), False), (format_target(answer), True))``. ``append_eos``: the
    tokenizer's EOS ends the sequence (trained), unless the text already ends the turn.
    """

    question: str
    answer: str
    segments: tuple[Segment, ...] = ()
    append_eos: bool = True


# ----------------------------------------------------------------------------- text


def clean_text(text: str) -> str:
    """Strips surrounding and per-line trailing whitespace and thousands-separator commas."""
    text = _TRAILING_SPACE.sub("", text.strip())
    return _THOUSANDS_COMMA.sub("", text)


def preprocess(example: Example) -> Example:
    """Applies :func:`clean_text` to both fields."""
    return Example(clean_text(example.question), clean_text(example.answer))


def format_prompt(question: str) -> str:
    """The model input for a question (training and evaluation)."""
    return PROMPT_TEMPLATE.format(question=question)


def training_segments(example: Example) -> tuple[Segment, ...]:
    """The training text of ``example`` as ``(text, trained)`` pieces (see :class:`Example`)."""
    if example.segments:
        return tuple(example.segments)
    return ((format_prompt(example.question), False), (format_target(example.answer), True))


def prompt_segments(example: Example) -> tuple[Segment, ...]:
    """The pieces before the last trained one: the evaluation prompt, token for token the
    prefix the model saw in training before the answer it is scored on."""
    segments = training_segments(example)
    trained = [i for i, (_, is_trained) in enumerate(segments) if is_trained]
    if not trained:
        raise ValueError(f"example has no trained segment: {example!r}")
    return segments[: trained[-1]]


def format_target(answer: str) -> str:
    """The text the model must produce after the prompt (EOS is appended as a token id)."""
    return " " + answer


def reference_answer(answer: str) -> str:
    """The final answer after the last ``####`` of a GSM8K answer, normalised for exact match."""
    from hacbo_jax.data.exact_match import extract_final_answer

    final = extract_final_answer(answer)
    if final is None:
        raise ValueError(f"answer has no '####' final answer nor any number: {answer!r}")
    return final


# ----------------------------------------------------------------------------- loading


def _validate_jsonl(path: Path) -> int:
    """Checks every line is a JSON object with string "question" and "answer"; returns the count."""
    count = 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: malformed JSON ({error.msg}); expected one object "
                    '{"question": str, "answer": str} per line'
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                )
            for field in ("question", "answer"):
                if not isinstance(record.get(field), str):
                    found = (
                        "missing" if field not in record else f"a {type(record[field]).__name__}"
                    )
                    raise ValueError(
                        f'{path}:{line_number}: field "{field}" is {found}; expected a string '
                        f'(each line needs string fields "question" and "answer")'
                    )
            count += 1
    if count == 0:
        raise ValueError(f"{path} contains no examples")
    return count


def load_gsm8k(
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    hub_name: str | None = None,
    hub_config: str = "main",
    preprocess_text: bool = True,
) -> list[Example]:
    """Loads a GSM8K split through ``datasets``.

    Args:
      split: "train" or "test".
      data_dir: directory holding ``{split}.jsonl`` (default: the bundled ``hacbo_jax/assets/gsm8k``).
        Each line is validated first so that a bad file fails with its path and line number.
      hub_name: load ``datasets.load_dataset(hub_name, hub_config)`` instead (needs network),
        e.g. ``"openai/gsm8k"``; ``data_dir`` must then be None.
      preprocess_text: apply :func:`preprocess` (default True).
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if hub_name is not None:
        if data_dir is not None:
            raise ValueError("give either data_dir (local jsonl files) or hub_name, not both")
        table = datasets.load_dataset(hub_name, hub_config, split=split)
    else:
        path = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / f"{split}.jsonl"
        return load_gsm8k_file(path, preprocess_text=preprocess_text)
    return _examples_from_table(table, preprocess_text)


def _examples_from_table(table, preprocess_text: bool) -> list[Example]:
    missing = {"question", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"dataset lacks columns {sorted(missing)}; has {table.column_names}")
    examples = [Example(q, a) for q, a in zip(table["question"], table["answer"])]
    return [preprocess(e) for e in examples] if preprocess_text else examples


def load_gsm8k_file(path: str | Path, *, preprocess_text: bool = True) -> list[Example]:
    """Loads one GSM8K-format JSONL file (any name) through ``datasets``, validating it first."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K file {path} not found; expected a .jsonl file with one "
            '{"question": str, "answer": str} object per line'
        )
    _validate_jsonl(path)
    table = datasets.load_dataset("json", data_files={"rows": str(path)}, split="rows")
    return _examples_from_table(table, preprocess_text)


def holdout_split(
    num_examples: int, holdout_size: int = DEFAULT_HOLDOUT_SIZE, seed: int = DEFAULT_HOLDOUT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (train_indices, holdout_indices), each sorted ascending.

    The holdout is a seeded random subset of ``range(num_examples)``; it serves as the default
    micro-dev pool and must never be trained on.
    """
    if not 0 <= holdout_size < num_examples:
        raise ValueError(f"holdout_size={holdout_size} must be in [0, num_examples={num_examples})")
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[holdout_size:]), np.sort(order[:holdout_size])


# ----------------------------------------------------------------------------- tokenisation


class SFTArrays(NamedTuple):
    """Right-padded training arrays for N examples (see the module docstring for the convention)."""

    input_ids: np.ndarray  # int32[N, L]
    attention_mask: np.ndarray  # int32[N, L]
    targets: np.ndarray  # int32[N, L]
    loss_mask: np.ndarray  # float32[N, L]
    num_truncated: int  # examples cut at max_len

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``indices`` as a batch dict (numpy; hand it to a jitted step)."""
        return {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            "targets": self.targets[indices],
            "loss_mask": self.loss_mask[indices],
        }


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def segment_token_ids(tokenizer, pieces: Sequence[Sequence[Segment]]) -> list[list[list[int]]]:
    """Token ids of every segment (tokenised separately, without special tokens added; special
    tokens written in the text, such as a chat template's, are recognised), in one call."""
    flat = [text for segments in pieces for text, _ in segments]
    ids = token_ids(tokenizer, flat)
    out, start = [], 0
    for segments in pieces:
        out.append(ids[start : start + len(segments)])
        start += len(segments)
    return out


def tokenize_sft(
    examples: Sequence[Example], tokenizer, max_len: int = DEFAULT_MAX_LEN
) -> SFTArrays:
    """Tokenises each segment separately (so the prompt tokens are exactly the ones the model
    sees at evaluation) and lays the examples out right-padded to ``max_len``; loss_mask is 1
    where the target is a token of a trained segment or the appended EOS."""
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must be >= 2")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs eos_token_id and pad_token_id")
    pieces = [training_segments(e) for e in examples]
    ids_per_piece = segment_token_ids(tokenizer, pieces)
    n = len(examples)
    input_ids = np.full((n, max_len), tokenizer.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((n, max_len), dtype=np.int32)
    is_trained = np.zeros((n, max_len), dtype=bool)
    num_truncated = 0
    for row, (example, segments, ids) in enumerate(zip(examples, pieces, ids_per_piece)):
        sequence: list[int] = []
        trained: list[bool] = []
        for (_, flag), piece in zip(segments, ids):
            sequence += piece
            trained += [flag] * len(piece)
        if example.append_eos:
            sequence.append(tokenizer.eos_token_id)
            trained.append(True)
        if len(sequence) > max_len:
            num_truncated += 1
            sequence, trained = sequence[:max_len], trained[:max_len]
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        is_trained[row, : len(sequence)] = trained
    targets = np.full_like(input_ids, tokenizer.pad_token_id)
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = np.zeros((n, max_len), dtype=np.float32)
    loss_mask[:, :-1] = is_trained[:, 1:]
    return SFTArrays(input_ids, attention_mask, targets, loss_mask, num_truncated)


def prompt_token_ids(items: Sequence[str | Example], tokenizer) -> list[list[int]]:
    """Evaluation prompt ids: a string is a GSM8K question (``format_prompt``), an
    :class:`Example` gives its :func:`prompt_segments`, tokenised as in training."""
    pieces = [
        ((format_prompt(item), False),) if isinstance(item, str) else prompt_segments(item)
        for item in items
    ]
    return [[t for piece in ids for t in piece] for ids in segment_token_ids(tokenizer, pieces)]


class PromptBatch(NamedTuple):
    """Left-padded prompts for generation; rows >= ``num_valid`` repeat the last prompt (padding
    rows keep shapes fixed without all-masked rows) and must be ignored."""

    input_ids: np.ndarray  # int32[B, P]
    attention_mask: np.ndarray  # int32[B, P]
    num_valid: int


def tokenize_prompts(
    questions: Sequence[str | Example], tokenizer, prompt_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded prompt ids and mask [N, prompt_len] of questions or examples
    (:func:`prompt_token_ids`); over-long prompts keep their LAST ``prompt_len`` tokens (the
    part next to "Answer:"). Returns (ids, mask, num_truncated)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len} must be >= 1")
    prompts = prompt_token_ids(questions, tokenizer)
    ids = np.full((len(prompts), prompt_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(prompts), prompt_len), dtype=np.int32)
    num_truncated = 0
    for row, prompt in enumerate(prompts):
        if len(prompt) > prompt_len:
            num_truncated += 1
            prompt = prompt[-prompt_len:]
        ids[row, prompt_len - len(prompt) :] = prompt
        mask[row, prompt_len - len(prompt) :] = 1
    return ids, mask, num_truncated


def prompt_batches(
    questions: Sequence[str | Example], tokenizer, *, batch_size: int, prompt_len: int
) -> Iterator[PromptBatch]:
    """Fixed-shape [batch_size, prompt_len] left-padded prompt batches, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ids, mask, _ = tokenize_prompts(questions, tokenizer, prompt_len)
    for start in range(0, len(questions), batch_size):
        rows = np.arange(start, start + batch_size)
        num_valid = int(min(batch_size, len(questions) - start))
        rows = np.minimum(rows, len(questions) - 1)
        yield PromptBatch(ids[rows], mask[rows], num_valid)


# ----------------------------------------------------------------------------- sampling


class DataPosition(NamedTuple):
    """Where the sampler is: ``epoch`` and the number of examples already served in it."""

    epoch: int
    index: int


class EpochSampler:
    """Seeded epoch shuffling with an exactly restorable position.

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(num_examples)`` in
    consecutive batches of ``batch_size``; the incomplete last batch is dropped (fixed shapes),
    so an epoch has ``num_examples // batch_size`` batches. The permutation is a pure function
    of (seed, epoch), so restoring a :class:`DataPosition` resumes the identical stream.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        position: DataPosition = DataPosition(0, 0),
    ):
        if batch_size < 1 or num_examples < batch_size:
            raise ValueError(
                f"need 1 <= batch_size ({batch_size}) <= num_examples ({num_examples})"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = num_examples // batch_size
        self.position = position
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def position(self) -> DataPosition:
        return self._position

    @position.setter
    def position(self, position: DataPosition) -> None:
        epoch, index = int(position[0]), int(position[1])
        if (
            epoch < 0
            or not 0 <= index <= self.batches_per_epoch * self.batch_size
            or index % self.batch_size
        ):
            raise ValueError(
                f"invalid position {position}: need epoch >= 0 and index a multiple of "
                f"batch_size={self.batch_size} in [0, {self.batches_per_epoch * self.batch_size}]"
            )
        self._position = DataPosition(epoch, index)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    @property
    def epoch_fraction(self) -> float:
        """Progress in epochs as a float (for logs)."""
        return self._position.epoch + self._position.index / (
            self.batches_per_epoch * self.batch_size
        )

    def next_indices(self) -> np.ndarray:
        """The next batch's example indices; advances the position."""
        epoch, index = self._position
        if index >= self.batches_per_epoch * self.batch_size:
            epoch, index = epoch + 1, 0
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        batch = self._order[index : index + self.batch_size]
        self._position = DataPosition(epoch, index + self.batch_size)
        return batch
