"""Seeded generator of GSM8K-format synthetic word problems with difficulty knobs.

Each problem is an :class:`hacbo_jax.data.gsm8k.Example`: a templated question and a worked answer in
GSM8K style, one line per arithmetic step with a ``<<expr=result>>`` annotation, ending in
``#### n``. For example (family "inventory", two steps)::

    Question: Mia has 12 marbles. She gives 5 marbles to Leo. Then she finds 7 more marbles.
              How many marbles does Mia have now?
    Answer:   Mia has 12 - 5 = <<12-5=7>>7 marbles.
              Mia has 7 + 7 = <<7+7=14>>14 marbles.
              #### 14

Families: "inventory" (a running count changed by 1..n operations), "comparison" (a second
person has k more / fewer / times as many; optionally the total), "shopping" (price times
count; optionally the change from a bill). Knobs (:class:`SyntheticConfig`) bound the number of
steps, the magnitude of numbers, the operations and the families. All results are
positive integers <= ``max_value``.

A :class:`SyntheticTask` names a preset and gives disjoint "train" / "pool" / "eval" streams:
each stream has its own seed AND keeps only problems whose question hashes into its own
buckets, so no question text appears in two streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

from hacbo_jax.data.gsm8k import Example

OPERATIONS = ("+", "-", "*")
FAMILIES = ("inventory", "comparison", "shopping")
_FAMILY_STEPS = {"inventory": None, "comparison": (1, 2), "shopping": (1, 2)}

NAMES = (
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Sam", "he"),
    ("Zoe", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Tom", "he"),
    ("Emma", "she"),
    ("Jack", "he"),
    ("Nora", "she"),
    ("Omar", "he"),
    ("Ruby", "she"),
    ("Ivan", "he"),
    ("Sara", "she"),
    ("Noah", "he"),
    ("Ella", "she"),
    ("Max", "he"),
    ("Lucy", "she"),
    ("Dan", "he"),
)
OBJECTS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "coins",
    "cards",
    "shells",
    "stamps",
    "toys",
    "balloons",
    "candies",
    "eggs",
    "flowers",
    "crayons",
    "buttons",
    "rocks",
)
ITEMS = (
    ("pen", "pens"),
    ("notebook", "notebooks"),
    ("toy car", "toy cars"),
    ("mug", "mugs"),
    ("kite", "kites"),
    ("sandwich", "sandwiches"),
    ("ticket", "tickets"),
    ("plant", "plants"),
)
_OBJECTIVE = {"she": "her", "he": "him"}
_POSSESSIVE = {"she": "her", "he": "his"}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs.

    Attributes:
      min_steps, max_steps: number of arithmetic steps (answer lines before ``####``).
      max_start: starting quantities / prices are drawn from [2, max_start].
      max_operand: added / subtracted amounts are drawn from [1, max_operand].
      max_factor: multipliers are drawn from [2, max_factor].
      max_value: every intermediate and final result is <= max_value.
      operations: allowed operations, a subset of ("+", "-", "*").
      families: allowed problem families, a subset of FAMILIES.
    """

    min_steps: int = 1
    max_steps: int = 2
    max_start: int = 20
    max_operand: int = 10
    max_factor: int = 3
    max_value: int = 99
    operations: tuple[str, ...] = OPERATIONS
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps ({self.min_steps}) <= max_steps ({self.max_steps})"
            )
        if self.max_start < 2 or self.max_operand < 1 or self.max_factor < 2:
            raise ValueError(
                f"need max_start >= 2 (got {self.max_start}), max_operand >= 1 (got "
                f"{self.max_operand}), max_factor >= 2 (got {self.max_factor})"
            )
        if self.max_value < self.max_start + self.max_operand:
            raise ValueError(
                f"max_value={self.max_value} must be >= max_start + max_operand = "
                f"{self.max_start + self.max_operand}"
            )
        bad_ops = set(self.operations) - set(OPERATIONS)
        if bad_ops or not self.operations:
            raise ValueError(
                f"operations={self.operations}; choose a non-empty subset of {OPERATIONS}"
            )
        bad_families = set(self.families) - set(FAMILIES)
        if bad_families or not self.families:
            raise ValueError(f"families={self.families}; choose a non-empty subset of {FAMILIES}")
        if not self._families_for_steps():
            raise ValueError(
                f"no family in {self.families} supports {self.min_steps}..{self.max_steps} steps "
                "(comparison and shopping have 1 or 2 steps)"
            )
        if "shopping" in self.families and "*" not in self.operations:
            raise ValueError('family "shopping" needs operation "*"')

    def _families_for_steps(self) -> dict[int, tuple[str, ...]]:
        table = {}
        for steps in range(self.min_steps, self.max_steps + 1):
            allowed = tuple(
                f
                for f in self.families
                if _FAMILY_STEPS[f] is None or _FAMILY_STEPS[f][0] <= steps <= _FAMILY_STEPS[f][1]
            )
            if allowed:
                table[steps] = allowed
        return table


PRESETS: dict[str, SyntheticConfig] = {
    # one step, + and - on numbers <= 20: the easiest sanity task.
    "arith-tiny": SyntheticConfig(
        min_steps=1,
        max_steps=1,
        max_start=20,
        max_operand=9,
        max_value=40,
        operations=("+", "-"),
        families=("inventory",),
    ),
    # the default fine-tuning/eval task for the embedded model: 1-2 steps, + - * small numbers.
    "arith-small": SyntheticConfig(
        min_steps=1, max_steps=2, max_start=20, max_operand=10, max_factor=3, max_value=99
    ),
    # harder: up to 3 steps and larger numbers.
    "arith-medium": SyntheticConfig(
        min_steps=1, max_steps=3, max_start=50, max_operand=30, max_factor=5, max_value=300
    ),
}


# The task of SyntheticTask() and of the config's data.synthetic.preset when none is given.
DEFAULT_PRESET = "arith-small"


def _step_line(
    subject: str, left: int, op: str, right: int, unit: str, verb: str = "has"
) -> tuple[str, int]:
    result = {"+": left + right, "-": left - right, "*": left * right}[op]
    return (
        f"{subject} {verb} {left} {op} {right} = <<{left}{op}{right}={result}>>{result} {unit}.",
        result,
    )


def _pick_op(
    rng: np.random.Generator, cfg: SyntheticConfig, value: int, cap: int
) -> tuple[str, int] | None:
    """A random (op, operand) keeping the result in [1, cap], or None if none fits."""
    choices = []
    for op in cfg.operations:
        if op == "+" and value + 1 <= cap:
            choices.append((op, 1, min(cfg.max_operand, cap - value)))
        elif op == "-" and value >= 2:
            choices.append((op, 1, min(cfg.max_operand, value - 1)))
        elif op == "*" and 1 <= value and value * 2 <= cap:
            choices.append((op, 2, min(cfg.max_factor, cap // value)))
    if not choices:
        return None
    op, low, high = choices[rng.integers(len(choices))]
    return op, int(rng.integers(low, high + 1))


def _inventory(rng: np.random.Generator, cfg: SyntheticConfig, steps: int) -> Example:
    name, he = NAMES[rng.integers(len(NAMES))]
    friend = NAMES[rng.integers(len(NAMES))][0]
    while friend == name:
        friend = NAMES[rng.integers(len(NAMES))][0]
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    him, his = _OBJECTIVE[he], _POSSESSIVE[he]
    value = int(rng.integers(2, cfg.max_start + 1))
    sentences, lines = [f"{name} has {value} {obj}."], []
    for step in range(steps):
        picked = _pick_op(rng, cfg, value, cfg.max_value)
        if picked is None:  # only when max_value is tiny; fall back to adding 1
            picked = ("+", 1) if value < cfg.max_value else ("-", 1)
        op, k = picked
        then = "Then " if step else ""
        pronoun = he.capitalize() if not then else he
        if op == "+":
            verb = rng.integers(3)
            text = (
                f"{pronoun} buys {k} more {obj}.",
                f"{pronoun} finds {k} more {obj}.",
                f"{friend} gives {him} {k} {obj}.",
            )[verb]
            text = text if verb < 2 or not then else f"{friend} gives {him} {k} more {obj}."
        elif op == "-":
            text = (
                f"{pronoun} gives {k} {obj} to {friend}.",
                f"{pronoun} loses {k} {obj}.",
                f"{pronoun} sells {k} {obj}.",
            )[rng.integers(3)]
        else:
            named = {2: f"{pronoun} doubles {his} {obj}.", 3: f"{pronoun} triples {his} {obj}."}
            text = (
                named.get(k)
                if rng.integers(2) and k in named
                else (f"{pronoun} gets {k} times as many {obj} as {he} had.")
            )
        if then and not text.startswith(friend):
            text = then + text
        sentences.append(text)
        line, value = _step_line(name, value, op, k, obj)
        lines.append(line)
    question = " ".join(sentences) + f" How many {obj} does {name} have now?"
    return Example(question, "\n".join(lines) + f"\n#### {value}")


def _comparison(rng: np.random.Generator, cfg: SyntheticConfig, steps: int) -> Example:
    (first, _), (second, _) = (NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False))
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    base = int(rng.integers(2, cfg.max_start + 1))
    # With a total to compute, the second count must leave room for base + other <= max_value.
    cap = cfg.max_value - base if steps == 2 else cfg.max_value
    op, k = _pick_op(rng, cfg, base, cap) or ("-", 1)
    relation = {
        "+": f"{k} more {obj} than {first}",
        "-": f"{k} fewer {obj} than {first}",
        "*": f"{k} times as many {obj} as {first}",
    }[op]
    line, other = _step_line(second, base, op, k, obj)
    question = f"{first} has {base} {obj}. {second} has {relation}."
    if steps == 1:
        return Example(question + f" How many {obj} does {second} have?", f"{line}\n#### {other}")
    total_line, total = _step_line("Together they", base, "+", other, obj, verb="have")
    return Example(
        question + f" How many {obj} do {first} and {second} have together?",
        f"{line}\n{total_line}\n#### {total}",
    )


def _shopping(rng: np.random.Generator, cfg: SyntheticConfig, steps: int) -> Example:
    name, he = NAMES[rng.integers(len(NAMES))]
    item, items = ITEMS[rng.integers(len(ITEMS))]
    price = int(rng.integers(2, min(cfg.max_start, cfg.max_value // 2) + 1))
    count = int(rng.integers(2, max(2, min(cfg.max_factor, cfg.max_value // price)) + 1))
    cost = price * count
    line = f"{name} spends {price} * {count} = <<{price}*{count}={cost}>>{cost} dollars."
    question = f"A {item} costs ${price}. {name} buys {count} {items}."
    if steps == 1:
        return Example(
            question + f" How much does {name} spend in dollars?", f"{line}\n#### {cost}"
        )
    bill = next((b for b in (10, 20, 50, 100, 200, 500) if b >= cost and b <= cfg.max_value), None)
    if bill is None or bill == cost:
        bill = cost + int(rng.integers(1, cfg.max_operand + 1))
    change = bill - cost
    change_line = f"{name} gets {bill} - {cost} = <<{bill}-{cost}={change}>>{change} dollars back."
    return Example(
        question
        + f" {he.capitalize()} pays with a ${bill} bill. How much change does {name} get in dollars?",
        f"{line}\n{change_line}\n#### {change}",
    )


_GENERATORS = {"inventory": _inventory, "comparison": _comparison, "shopping": _shopping}


def generate_problem(
    rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()
) -> Example:
    """One random problem drawn with ``rng`` under ``config``."""
    table = config._families_for_steps()
    steps = list(table)[rng.integers(len(table))]
    family = table[steps][rng.integers(len(table[steps]))]
    return _GENERATORS[family](rng, config, steps)


def generate_problems(
    n: int, seed: int, config: SyntheticConfig = SyntheticConfig()
) -> list[Example]:
    """``n`` problems from ``np.random.default_rng(seed)`` (deterministic)."""
    rng = np.random.default_rng(seed)
    return [generate_problem(rng, config) for _ in range(n)]


# ----------------------------------------------------------------------------- named tasks

# Ten hash buckets of the question text: 8 train, 1 pool (micro-dev), 1 eval.
_STREAM_BUCKETS = {"train": range(0, 8), "pool": range(8, 9), "eval": range(9, 10)}
_STREAM_IDS = {"train": 0, "pool": 1, "eval": 2}


def question_bucket(question: str) -> int:
    """Stable bucket 0..9 of a question text (sha256, independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:4], "big") % 10


class SyntheticTask:
    """A named preset with content-disjoint "train" / "pool" / "eval" streams.

    ``SyntheticTask("arith-small").examples("eval", 200)`` is the same list on every call.
    """

    def __init__(
        self, name: str = DEFAULT_PRESET, *, seed: int = 0, config: SyntheticConfig | None = None
    ):
        if config is None:
            if name not in PRESETS:
                raise ValueError(f"unknown synthetic task {name!r}; presets: {sorted(PRESETS)}")
            config = PRESETS[name]
        self.name = name
        self.seed = seed
        self.config = config

    def stream(self, split: str) -> Iterator[Example]:
        """Endless deterministic stream of problems of ``split`` ("train", "pool" or "eval")."""
        if split not in _STREAM_BUCKETS:
            raise ValueError(f"split={split!r}; expected one of {tuple(_STREAM_BUCKETS)}")
        buckets = _STREAM_BUCKETS[split]
        rng = np.random.default_rng([self.seed, _STREAM_IDS[split]])
        while True:
            example = generate_problem(rng, self.config)
            if question_bucket(example.question) in buckets:
                yield example

    def examples(self, split: str, n: int) -> list[Example]:
        """The first ``n`` problems of :meth:`stream`."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        stream = self.stream(split)
        return [next(stream) for _ in range(n)]

    def __repr__(self) -> str:
        return f"SyntheticTask({self.name!r}, seed={self.seed})"
