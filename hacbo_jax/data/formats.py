"""Question-answer data in three row formats, from local files or the hub, checked row by row.

``data.format`` (the config) names how a row becomes an :class:`~hacbo_jax.data.gsm8k.Example`
(its training text as ``(text, trained)`` segments, its evaluation prompt and reference):

- ``question_answer``: ``{question, answer}`` strings; the GSM8K layout
  ``"Question: {question}\\nAnswer:"`` (not trained) + ``" {answer}"`` + EOS (trained), with the
  GSM8K whitespace / thousands-comma clean-up (:func:`hacbo_jax.data.gsm8k.preprocess`).
- ``prompt_completion``: ``{prompt, completion}`` strings, used verbatim: ``prompt`` (not
  trained) + ``completion`` + EOS (trained); the reference is the completion.
- ``messages``: ``{messages: [{role, content}, ...]}`` with at least one ``assistant`` turn,
  rendered with the tokenizer's chat template. Loss on assistant turns only: each assistant
  turn's content and the end-of-turn token the template writes right after it (the tokenizer's
  EOS, e.g. Qwen's ``<|im_end|>``) are trained; everything else (system and user turns, role
  headers, an empty ``<think>`` block) is not. When the template writes no EOS after the last
  assistant turn, EOS is appended (trained). The evaluation prompt is the rendered text before
  the last assistant content, so the model is scored on the last turn; the reference is that
  turn's content.

Column names are configurable (``data.columns.*``). Files: ``.jsonl`` (one JSON object per
line), ``.json`` (a list of objects, or JSON lines) and ``.parquet``, all read through
``datasets``; or a hub data set (``datasets.load_dataset(hub_name, hub_config, split=...)``).
Every row is checked before any training; bad rows raise ONE :class:`DataError` naming the
file, the row (the line for JSONL) and the field, listing up to :data:`MAX_REPORTED` of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hacbo_jax.data.gsm8k import Example, Segment, preprocess

__all__ = [
    "DEFAULT_COLUMNS",
    "FORMATS",
    "DataError",
    "check_rows",
    "load_examples",
    "load_hub_examples",
    "messages_example",
    "row_problem",
    "rows_to_examples",
]

FORMATS = ("question_answer", "prompt_completion", "messages")
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_COLUMNS = {
    "question": "question",
    "answer": "answer",
    "prompt": "prompt",
    "completion": "completion",
    "messages": "messages",
}
# The fields each format reads (keys of DEFAULT_COLUMNS).
FORMAT_FIELDS = {
    "question_answer": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
MAX_REPORTED = 5


class DataError(ValueError):
    """Bad data rows; the message names the source, the rows and the fields."""


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_COLUMNS)
    merged.update(columns or {})
    return merged


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def row_problem(row: Any, data_format: str, columns: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with one row for ``data_format`` (naming the field), or None."""
    if data_format not in FORMATS:
        raise ValueError(f"data_format={data_format!r}; expected one of {FORMATS}")
    if not isinstance(row, Mapping):
        return f"expected a JSON object, got {_kind(row)}"
    names = _columns(columns)
    if data_format != "messages":
        for role in FORMAT_FIELDS[data_format]:
            name = names[role]
            if name not in row:
                return f'field "{name}" is missing; expected a string'
            if not isinstance(row[name], str):
                return f'field "{name}" is {_kind(row[name])}; expected a string'
        return None
    name = names["messages"]
    turns = row.get(name)
    if name not in row:
        return f'field "{name}" is missing; expected a list of {{"role", "content"}} objects'
    if not isinstance(turns, (list, tuple)) or not turns:
        return f'field "{name}" is {_kind(turns) if turns != [] else "empty"}; expected a non-empty list of {{"role", "content"}} objects'
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return f'field "{name}[{i}]" is {_kind(turn)}; expected a {{"role", "content"}} object'
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                return f'field "{name}[{i}].{key}" is {_kind(turn.get(key)) if key in turn else "missing"}; expected a string'
    if not any(turn["role"] == "assistant" for turn in turns):
        return f'field "{name}" has no "assistant" turn; the loss is on assistant turns only'
    return None


def messages_example(messages: Sequence[Mapping[str, str]], tokenizer) -> Example:
    """One ``messages`` conversation as an :class:`Example` (see the module docstring).

    Raises ValueError when the tokenizer has no chat template or the template does not write an
    assistant turn's content verbatim (the trained span could not be located exactly).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"data.format 'messages' needs a tokenizer with a chat template; "
            f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)} has none"
        )
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
    eos = tokenizer.eos_token
    segments: list[Segment] = []
    cursor = 0
    ends_with_eos = False
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        content = turn["content"].strip()
        start = text.find(content, cursor)
        if not content or start < 0:
            raise ValueError(
                f"messages[{i}] (assistant): the chat template does not write its content "
                "verbatim, so the trained tokens cannot be located"
                if content
                else f"messages[{i}] (assistant): empty content; nothing to train on"
            )
        end = start + len(content)
        after = text[end:]
        gap = len(after) - len(after.lstrip())
        ends_with_eos = bool(eos) and after[gap:].startswith(eos)
        if ends_with_eos:
            end += gap + len(eos)
        segments += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    if cursor < len(text):
        segments.append((text[cursor:], False))
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    users = [t["content"] for t in turns[:last] if t["role"] == "user"]
    return Example(
        question=users[-1] if users else "",
        answer=turns[last]["content"].strip(),
        segments=tuple(s for s in segments if s[0] or s[1]),
        append_eos=not ends_with_eos,
    )


def check_rows(
    rows: Sequence[Any],
    data_format: str,
    *,
    columns: Mapping[str, str] | None = None,
    source: str = "data",
    row_labels: Sequence[str] | None = None,
) -> None:
    """DataError listing the rows :func:`row_problem` rejects (and an empty source)."""
    labels = row_labels or [f"row {i}" for i in range(1, len(rows) + 1)]
    names = _columns(columns)
    problems = [
        f"{label}: {why}"
        for label, row in zip(labels, rows)
        if (why := row_problem(row, data_format, names)) is not None
    ]
    _raise(source, problems + ([] if rows else ["no rows"]), data_format, names)


def rows_to_examples(
    rows: Sequence[Any],
    data_format: str,
    *,
    columns: Mapping[str, str] | None = None,
    tokenizer=None,
    source: str = "data",
    row_labels: Sequence[str] | None = None,
    preprocess_text: bool = True,
) -> list[Example]:
    """Checks every row, then converts them; DataError naming source, rows and fields.

    ``row_labels`` name the rows in messages (default ``row 1``, ``row 2``, ...).
    ``preprocess_text`` applies the GSM8K clean-up to ``question_answer`` rows only.
    """
    labels = row_labels or [f"row {i}" for i in range(1, len(rows) + 1)]
    names = _columns(columns)
    check_rows(rows, data_format, columns=names, source=source, row_labels=labels)
    if data_format in ("question_answer", "prompt_completion"):
        _check_trained_text(rows, names[FORMAT_FIELDS[data_format][1]], source)
    if data_format == "question_answer":
        examples = [Example(r[names["question"]], r[names["answer"]]) for r in rows]
        return [preprocess(e) for e in examples] if preprocess_text else examples
    if data_format == "prompt_completion":
        return [
            Example(
                r[names["prompt"]],
                r[names["completion"]],
                segments=((r[names["prompt"]], False), (r[names["completion"]], True)),
            )
            for r in rows
        ]
    if tokenizer is None:
        raise ValueError("data.format 'messages' needs the tokenizer (its chat template)")
    examples, problems = [], []
    for label, row in zip(labels, rows):
        try:
            examples.append(messages_example(row[names["messages"]], tokenizer))
        except ValueError as e:
            problems.append(f'{label}: field "{names["messages"]}": {e}')
    _raise(source, problems, data_format, names)
    return examples


def _check_trained_text(rows: Sequence[Mapping[str, Any]], field: str, source: str) -> None:
    """DataError when every row's trained field is empty or whitespace: the run would train on
    the end token alone."""
    if rows and all(not row[field].strip() for row in rows):
        raise DataError(
            f'{source}: field "{field}" is empty or whitespace in all {len(rows)} rows; '
            "nothing to train on but the end token (check data.format and data.columns)"
        )


def _raise(source: str, problems: list[str], data_format: str, names: Mapping[str, str]) -> None:
    if not problems:
        return
    fields = ", ".join(f'"{names[f]}"' for f in FORMAT_FIELDS[data_format])
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataError(
        f"{source}: {len(problems)} bad row(s) for data.format '{data_format}' (fields {fields}):\n"
        + "\n".join(f"  {p}" for p in shown)
        + more
    )


def _read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    """Rows of a JSONL file and their ``line N`` labels; DataError on malformed lines."""
    rows, labels, problems = [], [], []
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith("["):
            raise DataError(
                f"{path}: holds a JSON array, not one object per line (JSONL); write one JSON "
                "object per line, or name the file .json"
            )
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                labels.append(f"line {number}")
            except json.JSONDecodeError as error:
                problems.append(f"line {number}: malformed JSON ({error.msg})")
    if problems:
        raise DataError(
            f"{path}: {len(problems)} malformed line(s); expected one JSON object per line:\n"
            + "\n".join(f"  {p}" for p in problems[:MAX_REPORTED])
        )
    return rows, labels


def load_examples(
    path: str | Path,
    data_format: str = "question_answer",
    *,
    columns: Mapping[str, str] | None = None,
    tokenizer=None,
    preprocess_text: bool = True,
) -> list[Example]:
    """Examples of a local ``.jsonl`` / ``.json`` / ``.parquet`` file, loaded through
    ``datasets`` after every row was checked (JSONL rows are checked line by line first, so
    that a bad line is reported by number instead of as an Arrow type error)."""
    import datasets

    path = Path(path)
    builder = FILE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type; expected one of {sorted(FILE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    labels = None
    if path.suffix.lower() == ".jsonl":
        rows, labels = _read_jsonl(path)
        check_rows(rows, data_format, columns=columns, source=str(path), row_labels=labels)
    try:
        table = datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows")
    except Exception as error:  # datasets raises many types; name the file
        raise DataError(f"{path}: cannot be read as {builder} by datasets: {error}") from error
    return rows_to_examples(
        table.to_list(),
        data_format,
        columns=columns,
        tokenizer=tokenizer,
        source=str(path),
        row_labels=labels,
        preprocess_text=preprocess_text,
    )


def load_hub_examples(
    hub_name: str,
    split: str,
    data_format: str = "question_answer",
    *,
    hub_config: str | None = None,
    columns: Mapping[str, str] | None = None,
    tokenizer=None,
    preprocess_text: bool = True,
) -> list[Example]:
    """Examples of ``datasets.load_dataset(hub_name, hub_config, split=split)`` (the local
    datasets cache, or the network when allowed), checked row by row."""
    import datasets

    table = datasets.load_dataset(hub_name, hub_config, split=split)
    source = (
        f"{hub_name}" + (f" (config {hub_config!r})" if hub_config else "") + f" split {split!r}"
    )
    return rows_to_examples(
        table.to_list(),
        data_format,
        columns=columns,
        tokenizer=tokenizer,
        source=source,
        preprocess_text=preprocess_text,
    )
