"""Hostile-input harness for the command lines of hacbo_jax.

Runs well over a hundred cases of odd input -- config values, config files, model and tokenizer
directories, data files, command-line usage, output directories, interruptions -- against the
real entry points (``python -m train.<tool>``) as subprocesses, each in its own temporary
directory and with a time limit, and classifies each outcome:

* ``clean-refusal``: exit 2, a ``PROG: error: ...`` message (naming what the case expects it
  to name), no traceback, nothing written into the output directory;
* ``clean-run``: exit 0 on input that is valid (odd but legal);
* ``documented-code``: 3, 4, 130 or 143 where the case expects that code;
* ``PROBLEM``: a traceback, a hang (time limit), exit 1 or another undocumented status, exit 0 on
  nonsense (silent acceptance), a refusal of valid input, or files overwritten or lost.

    .venv-test/bin/python scripts/hostile_round.py --out /tmp/hostile.json [--only TEXT] [--list]

It prints a table (case, entry point, exit code, class, first line of the message) and the
counts, and writes the results as JSON to ``--out`` (an existing file is refused). Cases run one
at a time (``-j 1``, the only value): a run of the tiny model takes both cores for ~15 s.
Takes about 15-25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL_ASSET = ROOT / "hacbo_jax" / "assets" / "tiny-qwen3-gsm"

REFUSAL, RUN, CODE, PROBLEM = "clean-refusal", "clean-run", "documented-code", "PROBLEM"

# tiny_cpu scaled down so that a run takes seconds: 2 steps, 4 evaluated problems, no export.
QUICK = [
    "optim.max_steps=2",
    "optim.warmup_steps=1",
    "optim.batch_size=8",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "data.heldout_size=16",
    "data.max_len=112",
    "microdev.size=8",
    "microdev.batch_size=4",
    "microdev.max_candidates=8",
    "eval.limit=4",
    "eval.max_new_tokens=8",
    "eval.batch_size=4",
    "eval.at_start=false",
    "checkpoint.export_hf=false",
    "logging.every=1",
]


def merged(base: list[str], extra: list[str]) -> list[str]:
    """``base`` overrides with ``extra``'s replacing the same keys (the CLI refuses a key twice)."""
    out: dict[str, str] = {}
    for item in [*base, *extra]:
        out[item.partition("=")[0].strip() if "=" in item else item] = item
    return list(out.values())


def good_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"question": f"Tom has {a} apples and buys {a % 7 + 1} more. How many now?",
         "answer": f"{a} + {a % 7 + 1} = {a + a % 7 + 1}\n#### {a + a % 7 + 1}"}
        for a in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list, *, newline: str = "\n", bom: bool = False) -> Path:
    text = newline.join(json.dumps(r) for r in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def tree_digest(path: Path) -> str:
    """A digest of every file (name and bytes) under ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".run.lock":
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass
class Ctx:
    """A case's temporary directory and the fixtures it may copy."""

    dir: Path
    fixtures: Path
    notes: list[str] = dataclasses.field(default_factory=list)
    guarded: dict[Path, str] = dataclasses.field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.dir / "run"

    def fin(self, *extra: str, out: Path | str | None = None, config: str = "tiny_cpu") -> list[str]:
        """``--config tiny_cpu`` + the quick overrides + ``extra`` (replacing the same keys)."""
        target = self.out if out is None else out
        return ["--config", config, *merged([f"output_dir={target}", *QUICK], list(extra))]

    def model_copy(self, name: str = "model") -> Path:
        dst = self.dir / name
        shutil.copytree(MODEL_ASSET, dst)
        return dst

    def finished_run(self, name: str = "done") -> Path:
        dst = self.dir / name
        shutil.copytree(self.fixtures / "finished_run", dst, symlinks=True)
        # the run's config names its own output_dir: point it at the copy
        cfg = dst / "config.yaml"
        cfg.write_text(cfg.read_text().replace(str(self.fixtures / "finished_run"), str(dst)))
        return dst

    def guard(self, path: Path) -> Path:
        """Remembers ``path``'s content: the case is a PROBLEM if it changes or disappears."""
        self.guarded[path] = tree_digest(path)
        return path

    def file(self, name: str, data: str | bytes) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def data(self, train_rows=None, eval_rows=None, **kw) -> list[str]:
        """Overrides for question/answer files (``*_rows``: a list of rows, or bytes as is)."""
        def put(name, rows, default):
            rows = default if rows is None else rows
            if isinstance(rows, (bytes, str)):
                return self.file(name, rows)
            return write_jsonl(self.dir / name, rows, **kw)

        train = put("train.jsonl", train_rows, good_rows(96))
        ev = put("eval.jsonl", eval_rows, good_rows(8, start=500))
        return ["data.task=gsm8k", f"data.train_file={train}", f"data.eval_file={ev}"]


@dataclasses.dataclass
class Case:
    name: str
    category: str
    entry: str  # module under train/
    args: Callable[[Ctx], list[str]]
    expect: tuple[str, ...] = (REFUSAL,)  # the acceptable classes
    codes: tuple[int, ...] = ()  # documented codes this case may end with
    mentions: tuple[str, ...] = ()  # text a refusal must contain (key, file, value)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float = 120.0
    signal_on: tuple[int, str] | None = None  # (signal, file under the case dir to wait for)
    check: Callable[[Ctx, dict], str | None] | None = None  # extra check after the command
    fresh_out: bool = True  # a refusal must leave ctx.out absent


CASES: list[Case] = []


def case(name, category, entry, args, **kw) -> None:
    CASES.append(Case(name, category, entry, args, **kw))


def fin_value(name, *overrides, mentions=(), expect=(REFUSAL,), **kw):
    """A finetune case with bad (or odd) override values."""
    case(name, "config values", "finetune", lambda c: c.fin(*overrides), mentions=mentions,
         expect=expect, **kw)


# ----------------------------------------------------------------------------- config values
fin_value("lr negative", "optim.lr=-1e-4", mentions=("optim.lr",))
fin_value("lr NaN", "optim.lr=.nan", mentions=("optim.lr",))
fin_value("lr inf", "optim.lr=.inf", mentions=("optim.lr",))
fin_value("lr 1e400 (inf by YAML)", "optim.lr=1.0e+400", mentions=("optim.lr",))
fin_value("lr a word", "optim.lr=fast", mentions=("optim.lr", "fast"))
fin_value("lr a list", "optim.lr=[1e-4, 2e-4]", mentions=("optim.lr",))
fin_value("lr a mapping", "optim.lr={a: 1}", mentions=("optim.lr",))
fin_value("lr empty", "optim.lr=", mentions=("optim.lr",))
fin_value("lr boolean", "optim.lr=true", mentions=("optim.lr",))
fin_value("batch_size 0", "optim.batch_size=0", mentions=("optim.batch_size",))
fin_value("batch_size negative", "optim.batch_size=-8", mentions=("optim.batch_size",))
fin_value("batch_size 8.5", "optim.batch_size=8.5", mentions=("optim.batch_size",))
fin_value("batch_size true", "optim.batch_size=true", mentions=("optim.batch_size",))
fin_value("batch_size '1e3' (a string)", "optim.batch_size=1e3", mentions=("optim.batch_size",))
fin_value("batch_size larger than the data", "optim.batch_size=100000",
          mentions=("optim.batch_size",))
fin_value("micro_batch_size not dividing", "optim.micro_batch_size=3",
          mentions=("optim.micro_batch_size",))
fin_value("micro_batch_size > batch", "optim.micro_batch_size=16",
          mentions=("optim.micro_batch_size",))
fin_value("epochs 0", "optim.epochs=0", mentions=("optim.epochs",))
fin_value("max_steps 0", "optim.max_steps=0", mentions=("optim.max_steps",))
fin_value("max_steps negative", "optim.max_steps=-3", mentions=("optim.max_steps",))
fin_value("max_steps 10**30", "optim.max_steps=1000000000000000000000000000000",
          mentions=("optim.max_steps",))
fin_value("warmup negative", "optim.warmup_steps=-1", mentions=("optim.warmup_steps",))
fin_value("b1 1.5", "optim.b1=1.5", mentions=("optim.b1",))
fin_value("b2 negative", "optim.b2=-0.1", mentions=("optim.b2",))
fin_value("weight_decay negative", "optim.weight_decay=-1", mentions=("optim.weight_decay",))
fin_value("clip_norm negative", "optim.clip_norm=-1", mentions=("optim.clip_norm",))
fin_value("seed negative", "seed=-1", mentions=("seed",))
fin_value("seed a word", "seed=abc", mentions=("seed",))
fin_value("seed 1.5", "seed=1.5", mentions=("seed",))
fin_value("max_len 0", "data.max_len=0", mentions=("data.max_len",))
fin_value("max_len negative", "data.max_len=-5", mentions=("data.max_len",))
fin_value("max_len 4 (answers cut off: trains on nothing)", "data.max_len=4",
          expect=(REFUSAL, CODE), codes=(4,), mentions=("max_len",))
fin_value("n_train 0", "data.synthetic.n_train=0", mentions=("n_train",))
fin_value("n_eval 0", "data.synthetic.n_eval=0", mentions=("n_eval",))
fin_value("preset unknown", "data.synthetic.preset=arith-huge", mentions=("preset", "arith-huge"))
fin_value("task unknown", "data.task=poetry", mentions=("data.task", "poetry"))
fin_value("format unknown", "data.format=csv", mentions=("data.format",))
fin_value("dtype int8", "model.dtype=int8", mentions=("model.dtype",))
fin_value("param_dtype misspelt", "model.param_dtype=bfloat17", mentions=("model.param_dtype",))
fin_value("remat unknown", "model.remat=sometimes", mentions=("model.remat",))
fin_value("attention_impl unknown", "model.attention_impl=flash",
          mentions=("model.attention_impl",))
fin_value("logits_chunk 0", "model.logits_chunk=0", mentions=("model.logits_chunk",))
fin_value("model.path empty", "model.path=", mentions=("model.path",))
fin_value("model.path missing dir", "model.path=/nonexistent/model", mentions=("/nonexistent/model",))
fin_value("controller unknown", "controller.kind=magic", mentions=("controller.kind", "magic"))
fin_value("hacbo rho 2", "controller.hacbo.rho=2", mentions=("controller.hacbo.rho",))
fin_value("hacbo interval 0", "controller.hacbo.interval=0", mentions=("controller.hacbo.interval",))
fin_value("hacbo patience negative", "controller.hacbo.patience=-1",
          mentions=("controller.hacbo.patience",))
fin_value("hacbo gamma NaN", "controller.hacbo.gamma=.nan", mentions=("controller.hacbo.gamma",))
fin_value("hacbo curvature_norm unknown", "controller.hacbo.curvature_norm=l7",
          mentions=("curvature_norm",))
fin_value("microdev size 0", "microdev.size=0", mentions=("microdev.size",))
fin_value("microdev pool unknown", "microdev.pool=elsewhere", mentions=("microdev.pool",))
fin_value("microdev refresh_every negative", "microdev.refresh_every=-1",
          mentions=("microdev.refresh_every",))
fin_value("microdev refresh_fraction 1.5", "microdev.refresh_fraction=1.5",
          mentions=("microdev.refresh_fraction",))
fin_value("eval limit negative", "eval.limit=-1", mentions=("eval.limit",))
fin_value("eval limit 0 (scores nothing)", "eval.limit=0", mentions=("eval.limit",))
fin_value("eval max_new_tokens 0", "eval.max_new_tokens=0", mentions=("eval.max_new_tokens",))
fin_value("eval batch_size 0", "eval.batch_size=0", mentions=("eval.batch_size",))
fin_value("logging every 0", "logging.every=0", mentions=("logging.every",))
fin_value("checkpoint every 0 (documented: only at the end)", "checkpoint.every=0", expect=(RUN,))
fin_value("checkpoint keep 0", "checkpoint.keep=0", mentions=("checkpoint.keep",))
fin_value("divergence 0", "divergence.max_consecutive_nonfinite=0",
          mentions=("max_consecutive_nonfinite",))
fin_value("mesh data 3 (one device)", "mesh.data=3", mentions=("mesh",))
fin_value("mesh fsdp 0", "mesh.fsdp=0", mentions=("mesh.fsdp",))
fin_value("method with a slash (a label: valid)", "method=a/b", expect=(RUN,))
fin_value("method empty string", "method=''", mentions=("method",))
fin_value("every problem at once", "optim.lr=-1", "seed=x", "data.max_len=0", "eval.limit=-2",
          "model.dtype=int3", mentions=("optim.lr", "seed", "data.max_len", "eval.limit",
                                        "model.dtype"))
for section in ("model", "data", "data.synthetic", "data.columns", "optim", "controller",
                "controller.hacbo", "microdev", "eval", "logging", "checkpoint", "divergence",
                "mesh"):
    fin_value(f"unknown key in {section}", f"{section}.bogus_key=1",
              mentions=(f"{section}.bogus_key",))
fin_value("unknown top-level key", "learning_rate=1e-4", mentions=("learning_rate",))
fin_value("section given a scalar", "optim=5", mentions=("optim",))
fin_value("scalar given a section", "optim.lr.value=1e-4", mentions=("optim.lr",))
fin_value("section key in wrong case", "Optim.lr=1e-4", mentions=("Optim",))
fin_value("python tag in an override", "optim.lr=!!python/object/apply:os.system [true]",
          mentions=("optim.lr",))
fin_value("unicode method name (valid)", "method=méthode-模型", expect=(RUN,))
fin_value("lr 0 (trains nothing)", "optim.lr=0", mentions=("optim.lr",))

# ----------------------------------------------------------------------------- config files
def cfg_file(name, data, mentions=(), expect=(REFUSAL,)):
    def args(c: Ctx):
        p = data(c) if callable(data) else c.file("cfg.yaml", data)
        return ["--config", str(p), f"output_dir={c.out}", *QUICK]

    case(name, "config files", "finetune", args, mentions=mentions, expect=expect)


cfg_file("empty YAML", b"", mentions=("cfg.yaml",))
cfg_file("YAML that is a list", b"- a\n- b\n", mentions=("cfg.yaml",))
cfg_file("YAML that is a string", b"just words\n", mentions=("cfg.yaml",))
cfg_file("binary file as config", bytes(range(256)) * 8, mentions=("cfg.yaml",))
cfg_file("invalid YAML syntax", b"optim: {lr: [1, 2\n", mentions=("cfg.yaml",))
cfg_file("non-UTF-8 config", b"extends: tiny_cpu\n# caf\xe9\n", mentions=("cfg.yaml",))
cfg_file("config with a BOM (valid)", b"\xef\xbb\xbfextends: tiny_cpu\n", expect=(RUN, REFUSAL))
cfg_file("extends a missing file", b"extends: nowhere.yaml\n", mentions=("nowhere",))
cfg_file("extends itself", lambda c: c.file("cfg.yaml", b"extends: cfg.yaml\n"),
         mentions=("cfg.yaml",))
cfg_file("extends a number", b"extends: 5\n", mentions=("extends",))
cfg_file("integer key", b"extends: tiny_cpu\n1: 2\n", mentions=("1",))
cfg_file("section as list", b"extends: tiny_cpu\noptim: [1, 2]\n", mentions=("optim",))
cfg_file("directory as config", lambda c: (c.dir / "confdir").mkdir() or c.dir / "confdir",
         mentions=("confdir",))
case("missing config file", "config files", "finetune",
     lambda c: ["--config", str(c.dir / "nope.yaml")], mentions=("nope.yaml",))
case("config name empty", "config files", "finetune", lambda c: ["--config", ""],
     mentions=("--config",))
cfg_file("config in JSON (valid YAML)",
         json.dumps({"extends": "tiny_cpu"}).encode(), expect=(RUN, REFUSAL))


# ----------------------------------------------------------------------------- command line
case("no --config", "command line", "finetune", lambda c: ["optim.lr=1e-4"],
     mentions=("--config",))
case("unknown flag", "command line", "finetune", lambda c: [*c.fin(), "--fast"],
     mentions=("--fast",))
case("abbreviated flag", "command line", "finetune", lambda c: [*c.fin(), "--resum"],
     mentions=("--resum",))
case("--config given twice", "command line", "finetune",
     lambda c: ["--config", "adamw", *c.fin()], mentions=("--config",))
case("override without '='", "command line", "finetune", lambda c: [*c.fin(), "optim.lr"],
     mentions=("optim.lr",))
case("override '=5'", "command line", "finetune", lambda c: [*c.fin(), "=5"], mentions=("=5",))
case("override with empty part", "command line", "finetune",
     lambda c: [*c.fin(), "optim..lr=1"], mentions=("optim..lr",))
case("override split by spaces", "command line", "finetune",
     lambda c: [*c.fin(), "optim.lr", "=", "1e-4"], mentions=("optim.lr",))
case("override value with a newline (YAML folds it: valid)", "command line", "finetune",
     lambda c: c.fin("method=a\nb"), expect=(RUN, REFUSAL), mentions=("method",))
case("--resume on a missing dir", "command line", "finetune",
     lambda c: [*c.fin(), "--resume"], mentions=("run",))
case("--print-config with a bad value", "command line", "finetune",
     lambda c: [*c.fin("optim.lr=-1"), "--print-config"], mentions=("optim.lr",))
case("--print-config with a missing model", "command line", "finetune",
     lambda c: [*c.fin("model.path=/nonexistent/m"), "--print-config"],
     mentions=("/nonexistent/m",))
case("output_dir with spaces and unicode (valid)", "command line", "finetune",
     lambda c: c.fin(out=c.dir / "my runs" / "ré sumé 模型"), expect=(RUN,),
     check=lambda c, r: None if (c.dir / "my runs" / "ré sumé 模型" / "summary.json").is_file()
     else "no summary.json in the unicode output_dir")


def resume_changed(c: Ctx) -> list[str]:
    run = c.guard(c.finished_run())
    return [*c.fin("optim.lr=1e-3", out=run), "--resume"]


case("--resume with another lr", "command line", "finetune", resume_changed,
     mentions=("optim.lr",), fresh_out=False)


def resume_other_config(c: Ctx) -> list[str]:
    run = c.guard(c.finished_run())
    other = c.file("other.yaml", "extends: tiny_cpu\ncontroller: {kind: none}\n")
    return ["--config", str(other), f"output_dir={run}", *QUICK, "--resume"]


case("--resume with another config file", "command line", "finetune", resume_other_config,
     mentions=("controller.kind",), fresh_out=False)


def resume_finished(c: Ctx) -> list[str]:
    run = c.guard(c.finished_run())
    return [*c.fin(out=run), "--resume"]


case("--resume of a finished run (valid)", "command line", "finetune", resume_finished,
     expect=(RUN,), fresh_out=False)


def rerun_finished(c: Ctx) -> list[str]:
    run = c.guard(c.finished_run())
    return c.fin(out=run)


case("same run again without --resume", "output dirs", "finetune", rerun_finished,
     mentions=("--resume",), fresh_out=False)

# ----------------------------------------------------------------------------- model files
def drop_tensor(c: Ctx, name: str = "model.norm.weight") -> Path:
    from safetensors.numpy import load_file, save_file

    m = c.model_copy()
    weights = load_file(str(m / "model.safetensors"))
    weights.pop(name)
    save_file(weights, str(m / "model.safetensors"))
    return m


def model_case(name, mutate, mentions=(), expect=(REFUSAL,), extra=(), **kw):
    def args(c: Ctx):
        m = c.model_copy()
        mutate(m)
        return c.fin(f"model.path={m}", *extra)

    case(name, "model files", "finetune", args, mentions=mentions, expect=expect, **kw)


def edit_config(**changes):
    def mutate(m: Path):
        cfg = json.loads((m / "config.json").read_text())
        for k, v in changes.items():
            if v is ...:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (m / "config.json").write_text(json.dumps(cfg))
    return mutate


def write(rel: str, data: bytes):
    return lambda m: (m / rel).write_bytes(data)


def remove(rel: str):
    return lambda m: (m / rel).unlink()


def truncate(rel: str, keep: float):
    def mutate(m: Path):
        data = (m / rel).read_bytes()
        (m / rel).write_bytes(data[: int(len(data) * keep)])
    return mutate


model_case("config.json missing", remove("config.json"), mentions=("config.json",))
model_case("config.json empty", write("config.json", b""), mentions=("config.json",))
model_case("config.json not JSON", write("config.json", b"{vocab_size: 3"), mentions=("config.json",))
model_case("config.json a list", write("config.json", b"[1, 2]"), mentions=("config.json",))
model_case("config.json without hidden_size", edit_config(hidden_size=...),
           mentions=("hidden_size",))
model_case("config.json hidden_size a string", edit_config(hidden_size="256"),
           mentions=("hidden_size",))
model_case("config.json hidden_size negative", edit_config(hidden_size=-256),
           mentions=("hidden_size",))
model_case("config.json heads not dividing", edit_config(num_key_value_heads=3),
           mentions=("num_key_value_heads",))
model_case("config.json vocab_size 0", edit_config(vocab_size=0), mentions=("vocab_size",))
model_case("config.json model_type gpt2", edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
           mentions=("gpt2",))
model_case("config.json rms_norm_eps NaN", write("config.json", (MODEL_ASSET / "config.json")
           .read_bytes().replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": NaN')),
           mentions=("rms_norm_eps",))
model_case("weights missing", remove("model.safetensors"), mentions=("safetensors",))
model_case("weights truncated", truncate("model.safetensors", 0.5), mentions=("model.safetensors",))
model_case("weights zero bytes", write("model.safetensors", b""), mentions=("model.safetensors",))
model_case("weights huge header length", write("model.safetensors",
           (2**62).to_bytes(8, "little") + b"{}"), mentions=("model.safetensors",))
model_case("weights header not JSON", write("model.safetensors",
           (10).to_bytes(8, "little") + b"not json!!" + b"\0" * 64), mentions=("model.safetensors",))
model_case("weights file is a directory",
           lambda m: ((m / "model.safetensors").unlink(), (m / "model.safetensors").mkdir()),
           mentions=("model.safetensors",))
model_case("tokenizer.json corrupt", write("tokenizer.json", b"{\"version\": "),
           mentions=("tokenizer",))
model_case("tokenizer.json binary", write("tokenizer.json", bytes(range(256))),
           mentions=("tokenizer",))
model_case("tokenizer_config.json corrupt", write("tokenizer_config.json", b"[[["),
           mentions=("tokenizer",))
model_case("tokenizer files missing", lambda m: ((m / "tokenizer.json").unlink(),
           (m / "tokenizer_config.json").unlink()), expect=(REFUSAL, RUN), mentions=("tokenizer",))
case("model.path is a file", "model files", "finetune",
     lambda c: c.fin(f"model.path={MODEL_ASSET / 'config.json'}"), mentions=("config.json",))
case("model.path a symlink loop", "model files", "finetune",
     lambda c: (os.symlink(c.dir / "loop", c.dir / "loop"), c.fin(f"model.path={c.dir / 'loop'}"))[1],
     mentions=("loop",))
case("model.path hub id, offline", "model files", "finetune",
     lambda c: c.fin("model.path=no-such-org/no-such-model"),
     mentions=("no-such-org/no-such-model",), env={"HF_HUB_OFFLINE": "1"})
# --print-config checks what is on disk only: a hub id not in the cache is printed (exit 0)
case("model.path hub id, offline, --print-config (prints)", "model files", "finetune",
     lambda c: [*c.fin("model.path=no-such-org/no-such-model"), "--print-config"],
     expect=(RUN,), env={"HF_HUB_OFFLINE": "1"})
case("--print-config with weights that miss a tensor", "model files", "finetune",
     lambda c: [*c.fin(f"model.path={drop_tensor(c)}"), "--print-config"],
     mentions=("model.norm.weight",))
case("model.tokenizer hub id, offline", "model files", "finetune",
     lambda c: c.fin("model.tokenizer=no-such-org/tok"), mentions=("no-such-org/tok",),
     env={"HF_HUB_OFFLINE": "1"})
case("model.tokenizer empty dir", "model files", "finetune",
     lambda c: ((c.dir / "tok").mkdir(), c.fin(f"model.tokenizer={c.dir / 'tok'}"))[1],
     mentions=("tok",))

# ----------------------------------------------------------------------------- data files
def data_case(name, train=None, ev=None, mentions=(), expect=(REFUSAL,), extra=(), **kw):
    def args(c: Ctx):
        return c.fin(*c.data(train, ev, **kw), "data.heldout_size=16", *extra)

    case(name, "data files", "finetune", args, mentions=mentions, expect=expect)


data_case("JSONL valid (baseline)", expect=(RUN,))
data_case("JSONL with a BOM", bom=True, expect=(RUN, REFUSAL), mentions=("train.jsonl",))
data_case("JSONL with CRLF (valid)", newline="\r\n", expect=(RUN,))
data_case("JSONL row missing answer", train=[*good_rows(95), {"question": "q?"}],
          mentions=("train.jsonl", "answer"))
data_case("JSONL answer a number", train=[*good_rows(95), {"question": "q?", "answer": 7}],
          mentions=("train.jsonl", "answer"))
data_case("JSONL question null", train=[*good_rows(95), {"question": None, "answer": "#### 1"}],
          mentions=("train.jsonl", "question"))
data_case("JSONL row a string", train=[*good_rows(95), "just a string"], mentions=("train.jsonl",))
data_case("JSONL truncated last line",
          train=(("\n".join(json.dumps(r) for r in good_rows(96)))[:-7]).encode(),
          mentions=("train.jsonl",))
data_case("JSONL non-UTF-8 bytes", train=b"\n".join(json.dumps(r).encode() for r in good_rows(95))
          + b'\n{"question": "caf\xe9?", "answer": "#### 1"}\n', mentions=("train.jsonl",))
data_case("JSONL empty file", train=b"", mentions=("train.jsonl",))
data_case("JSONL only blank lines", train=b"\n\n  \n", mentions=("train.jsonl",))
data_case("JSONL binary", train=bytes(range(256)) * 16, mentions=("train.jsonl",))
data_case("JSONL huge line (2 MB question, truncated to max_len)",
          train=[*good_rows(95), {"question": "many words " * 200_000, "answer": "x\n#### 1"}],
          expect=(RUN, REFUSAL), mentions=("train.jsonl",))
data_case("eval file empty", ev=b"", mentions=("eval.jsonl",))
data_case("answers without '####' (scores nothing)",
          train=[{"question": r["question"], "answer": "no marker"} for r in good_rows(96)],
          ev=[{"question": r["question"], "answer": "no marker"} for r in good_rows(8, 500)],
          mentions=("eval.jsonl",), expect=(REFUSAL, RUN))
data_case("columns renamed to a missing one", extra=("data.columns.question=problem",),
          mentions=("problem",))
data_case("messages format on question rows", extra=("data.format=messages",),
          mentions=("messages",))
data_case("fewer rows than the held-out pool", train=good_rows(10), mentions=("heldout",))
case("train_file a directory", "data files", "finetune",
     lambda c: ((c.dir / "d").mkdir(), c.fin(*c.data(), f"data.train_file={c.dir / 'd'}"))[1],
     mentions=("data.train_file",))
case("train_file missing", "data files", "finetune",
     lambda c: c.fin(*c.data(), f"data.train_file={c.dir / 'missing.jsonl'}"),
     mentions=("missing.jsonl",))
case("train_file .csv", "data files", "finetune",
     lambda c: c.fin(*c.data(), "data.train_file=" + str(c.file("t.csv", "question,answer\na,b"))),
     mentions=("t.csv",))
case("train_file .json a mapping", "data files", "finetune",
     lambda c: c.fin(*c.data(), f"data.train_file={c.file('t.json', json.dumps({'a': 1}))}"),
     mentions=("t.json",))
case("train_file .parquet corrupt", "data files", "finetune",
     lambda c: c.fin(*c.data(), f"data.train_file={c.file('t.parquet', b'PAR1garbage')}"),
     mentions=("t.parquet",))
case("hub data set offline", "data files", "finetune",
     lambda c: c.fin("data.task=gsm8k", "data.hub_name=no-such-org/no-such-data"),
     mentions=("no-such-org/no-such-data",), env={"HF_HUB_OFFLINE": "1"})

# ----------------------------------------------------------------------------- output dirs
def out_is_file(c: Ctx):
    f = c.guard(c.file("run", "my notes\n"))
    return c.fin()


case("output_dir is a file", "output dirs", "finetune", out_is_file, mentions=("output_dir",),
     fresh_out=False)


def out_under_file(c: Ctx):
    c.guard(c.file("notes", "x"))
    return c.fin(out=c.dir / "notes" / "run")


case("output_dir below a file", "output dirs", "finetune", out_under_file, mentions=("notes",))


def out_nonempty(c: Ctx):
    c.guard(c.file("run/thesis.tex", "years of work"))
    return c.fin()


case("output_dir holds other files", "output dirs", "finetune", out_nonempty,
     mentions=("output_dir",), fresh_out=False)


def out_symlink(c: Ctx):
    (c.dir / "real").mkdir()
    os.symlink(c.dir / "real", c.dir / "run")
    return c.fin()


case("output_dir a symlink to an empty dir (valid)", "output dirs", "finetune", out_symlink,
     expect=(RUN,), fresh_out=False,
     check=lambda c, r: None if (c.dir / "real" / "summary.json").is_file()
     else "the run did not land in the symlink's target")


def out_dangling(c: Ctx):
    os.symlink(c.dir / "nowhere", c.dir / "run")
    return c.fin()


case("output_dir a dangling symlink", "output dirs", "finetune", out_dangling,
     expect=(REFUSAL, RUN), mentions=("run",), fresh_out=False)
case("output_dir /dev/null", "output dirs", "finetune", lambda c: c.fin(out="/dev/null"),
     mentions=("/dev/null",))


def out_readonly(c: Ctx):
    (c.dir / "ro").mkdir()
    os.chmod(c.dir / "ro", 0o555)
    return c.fin(out=c.dir / "ro" / "run")


# as root a read-only directory is writable: the case can only run, then
case("output_dir inside a read-only dir", "output dirs", "finetune", out_readonly,
     expect=(REFUSAL,) if os.geteuid() else (REFUSAL, RUN), mentions=("ro",))


def out_cwd(c: Ctx):
    c.guard(c.file("notes.txt", "x"))
    return c.fin(out=".")


case("output_dir '.' (a non-empty cwd)", "output dirs", "finetune", out_cwd,
     mentions=("output_dir",))

# ----------------------------------------------------------------------------- interruptions
case("SIGINT during the run", "interruptions", "finetune",
     lambda c: c.fin("optim.max_steps=200", "checkpoint.every=1000"),
     expect=(CODE,), codes=(130,), signal_on=(signal.SIGINT, "run/metrics.jsonl"), timeout=180,
     fresh_out=False,
     check=lambda c, r: None if any((c.out / "checkpoints").glob("[0-9]*"))
     else "no checkpoint after SIGINT")
case("SIGTERM during the run", "interruptions", "finetune",
     lambda c: c.fin("optim.max_steps=200", "checkpoint.every=1000"),
     expect=(CODE,), codes=(143,), signal_on=(signal.SIGTERM, "run/metrics.jsonl"), timeout=180,
     fresh_out=False,
     check=lambda c, r: None if any((c.out / "checkpoints").glob("[0-9]*"))
     else "no checkpoint after SIGTERM")
case("divergence (lr 1e30)", "interruptions", "finetune",
     lambda c: c.fin("optim.lr=1.0e+30", "optim.clip_norm=null", "optim.max_steps=8",
                     "divergence.max_consecutive_nonfinite=2", "controller.kind=none"),
     expect=(CODE, REFUSAL), codes=(3, 4), mentions=("optim.lr",), fresh_out=False)

# ----------------------------------------------------------------------------- report
def report_dir_with(files: dict[str, bytes]):
    def args(c: Ctx):
        d = c.dir / "r"
        d.mkdir()
        for k, v in files.items():
            (d / k).write_bytes(v)
        return [str(d), "--out", str(c.dir / "rep")]
    return args


case("report on an empty dir", "report", "report", report_dir_with({}), mentions=("r",))
case("report on a missing dir", "report", "report", lambda c: [str(c.dir / "none")],
     mentions=("none",))
case("report on a file", "report", "report", lambda c: [str(c.file("f.txt", "x"))],
     mentions=("f.txt",))
case("report corrupt summary.json", "report", "report",
     report_dir_with({"summary.json": b"{\"steps\": 3,", "metrics.jsonl": b""}),
     mentions=("summary.json",))
case("report summary.json a list", "report", "report",
     report_dir_with({"summary.json": b"[1,2]"}), mentions=("summary.json",))
case("report binary metrics.jsonl", "report", "report",
     report_dir_with({"metrics.jsonl": bytes(range(256))}), mentions=("metrics.jsonl",))
case("report of a finished run (valid)", "report", "report",
     lambda c: [str(c.finished_run()), "--out", str(c.dir / "rep")], expect=(RUN,))


def report_out_file(c: Ctx):
    run = c.finished_run()
    return [str(run), "--out", str(c.guard(c.file("rep.md", "mine")))]


case("report --out is a file", "report", "report", report_out_file, mentions=("rep.md",))
case("report --out twice", "report", "report",
     lambda c: [str(c.finished_run()), "--out", str(c.dir / "a"), "--out", str(c.dir / "b")],
     mentions=("--out",))

# ----------------------------------------------------------------------------- export
def export(step=None, out=None, run=True):
    def args(c: Ctx):
        r = c.finished_run() if run else c.dir / "none"
        extra = [] if step is None else ["--step", str(step)]
        return [str(r), *extra, "--out", str(out(c) if out else c.dir / "hf")]
    return args


case("export a step that does not exist", "export", "export_checkpoint", export(step=999),
     mentions=("999",))
case("export step -1", "export", "export_checkpoint", export(step=-1), mentions=("-1",))
case("export step a word", "export", "export_checkpoint", export(step="last"),
     mentions=("--step",))
case("export a missing run", "export", "export_checkpoint", export(run=False), mentions=("none",))
case("export an empty dir", "export", "export_checkpoint",
     lambda c: ((c.dir / "e").mkdir(), [str(c.dir / "e"), "--out", str(c.dir / "hf")])[1],
     mentions=("e",))
case("export the newest step (valid)", "export", "export_checkpoint", export(), expect=(RUN,))


def export_into_run(c: Ctx):
    run = c.guard(c.finished_run())
    return [str(run), "--out", str(run)]


case("export --out = the run itself", "export", "export_checkpoint", export_into_run,
     mentions=("--out",))


def export_corrupt_config(c: Ctx):
    run = c.finished_run()
    (run / "config.yaml").write_text("optim: [")
    return [str(run), "--out", str(c.dir / "hf")]


case("export with a corrupt config.yaml", "export", "export_checkpoint", export_corrupt_config,
     mentions=("config.yaml",))


def export_damaged_ckpt(c: Ctx):
    run = c.finished_run()
    for p in sorted((run / "checkpoints").rglob("*")):
        if p.is_file() and p.stat().st_size > 1000:
            p.write_bytes(b"\0" * 10)
    return [str(run), "--out", str(c.dir / "hf")]


case("export a damaged checkpoint", "export", "export_checkpoint", export_damaged_ckpt,
     mentions=("checkpoint",))

# ----------------------------------------------------------------------------- probe_curvature
def probe(*extra, model=True):
    def args(c: Ctx):
        m = str(MODEL_ASSET) if model is True else str(model(c))
        return [m, "--out", str(c.dir / "probe"), *extra]
    return args


case("probe a missing model dir", "probe_curvature", "probe_curvature",
     probe(model=lambda c: c.dir / "nope"), mentions=("nope",))
case("probe an empty model dir", "probe_curvature", "probe_curvature",
     probe(model=lambda c: (c.dir / "m").mkdir() or c.dir / "m"), mentions=("m",))
case("probe --rows 0", "probe_curvature", "probe_curvature", probe("--rows", "0"),
     mentions=("--rows",))
case("probe --seq-len -4", "probe_curvature", "probe_curvature", probe("--seq-len", "-4"),
     mentions=("--seq-len",))
case("probe --tol nan", "probe_curvature", "probe_curvature", probe("--tol", "nan"),
     mentions=("--tol",))
case("probe --data missing", "probe_curvature", "probe_curvature",
     probe("--data", "/nonexistent/x.npz"), mentions=("x.npz",))
case("probe --data corrupt npz", "probe_curvature", "probe_curvature",
     lambda c: probe("--data", str(c.file("d.npz", b"PK\x03\x04junk")))(c), mentions=("d.npz",))
case("probe --hacbo-state garbage", "probe_curvature", "probe_curvature",
     lambda c: probe("--hacbo-state", str(c.file("s.npz", b"junk")))(c), mentions=("s.npz",))
case("probe --groups unknown", "probe_curvature", "probe_curvature", probe("--groups", "atoms"),
     mentions=("--groups",))

# ----------------------------------------------------------------------------- compare
def compare(*extra):
    return lambda c: ["--config", "tiny_cpu", "--out", str(c.dir / "cmp"), *extra,
                      *merged(QUICK, [])]


case("compare --seeds 0", "compare", "compare", compare("--seeds", "0"), mentions=("--seeds",))
case("compare --seeds -1", "compare", "compare", compare("--seeds", "-1"), mentions=("--seeds",))
case("compare unknown method", "compare", "compare", compare("--methods", "sgd9"),
     mentions=("sgd9",))
case("compare --methods empty", "compare", "compare", compare("--methods", ""),
     mentions=("--methods",))
case("compare --seed-list words", "compare", "compare", compare("--seed-list", "a,b"),
     mentions=("--seed-list",))
case("compare --seed-list repeated seed", "compare", "compare", compare("--seed-list", "1,1"),
     mentions=("--seed-list",))
case("compare --lrs missing", "compare", "compare", compare("--lrs", "/nonexistent/lrs.yaml"),
     mentions=("lrs.yaml",))
case("compare --lrs corrupt", "compare", "compare",
     lambda c: compare("--lrs", str(c.file("lrs.yaml", "lr: [")))(c), mentions=("lrs.yaml",))
case("compare --lrs negative rate", "compare", "compare",
     lambda c: compare("--methods", "adamw", "--lrs", str(c.file("lrs.yaml", "lr: {adamw: -1}")))(c),
     mentions=("adamw",))
case("compare --lrs NaN rate", "compare", "compare",
     lambda c: compare("--methods", "adamw", "--lrs", str(c.file("lrs.yaml", "lr: {adamw: .nan}")))(c),
     mentions=("adamw",))
case("compare --out a file", "compare", "compare",
     lambda c: (c.guard(c.file("cmp", "x")), compare()(c))[1], mentions=("cmp",))
case("compare --report-only on nothing", "compare", "compare", compare("--report-only"),
     mentions=("cmp",))
case("compare bad override", "compare", "compare", compare("optim.lr=-3"), mentions=("optim.lr",))

# ----------------------------------------------------------------------------- sweep
def sweep(*extra):
    return lambda c: ["--config", "tiny_cpu", "--out", str(c.dir / "sw"), "--methods", "adamw",
                      *extra, *QUICK]


case("sweep --trials 0", "sweep", "sweep", sweep("--trials", "0"), mentions=("--trials",))
case("sweep --lo > --hi", "sweep", "sweep", sweep("--lo", "1e-2", "--hi", "1e-4"),
     mentions=("--lo",))
case("sweep --lo negative", "sweep", "sweep", sweep("--lo", "-1"), mentions=("--lo",))
case("sweep --hi nan", "sweep", "sweep", sweep("--hi", "nan"), mentions=("--hi",))
case("sweep unknown method", "sweep", "sweep",
     lambda c: ["--config", "tiny_cpu", "--out", str(c.dir / "sw"), "--methods", "zzz", *QUICK],
     mentions=("zzz",))
case("sweep --write a directory", "sweep", "sweep",
     lambda c: sweep("--write", str((c.dir / "w").mkdir() or c.dir / "w"))(c), mentions=("w",))
case("sweep --write corrupt lrs.yaml", "sweep", "sweep",
     lambda c: sweep("--trials", "1", "--write", str(c.guard(c.file("lrs.yaml", "lr: [")))) (c),
     mentions=("lrs.yaml",))
case("sweep --write lrs.yaml that is a list", "sweep", "sweep",
     lambda c: sweep("--trials", "1", "--write", str(c.guard(c.file("lrs.yaml", "- 1\n- 2\n"))))(c),
     mentions=("lrs.yaml",))
RECORDED = """lr: {adamw: 0.001, hacbo: 0.002}
trials:
  adamw: [{lr: 0.001, exact_match: 0.5, final_train_loss: 1.0, diverged: false}]
  hacbo: [{lr: 0.002, exact_match: 0.6, final_train_loss: 1.0, diverged: false}]
"""


def sweep_same_method(c: Ctx):
    return sweep("--trials", "1", "--write", str(c.guard(c.file("mine/lrs.yaml", RECORDED))))(c)


case("sweep into an lrs.yaml with that method's trials", "sweep", "sweep", sweep_same_method,
     mentions=("adamw", "lrs.yaml"))


def sweep_other_method_kept(c: Ctx, result: dict) -> str | None:
    import yaml

    data = yaml.safe_load((c.dir / "mine" / "lrs.yaml").read_text())
    if data["lr"].get("hacbo") != 0.002 or len(data["trials"].get("hacbo", [])) != 1:
        return "the recorded hacbo trials were dropped"
    if "blac" not in data["lr"]:
        return "the new method was not written"
    return None


case("sweep merges a new method into an existing lrs.yaml (valid)", "sweep", "sweep",
     lambda c: ["--config", "tiny_cpu", "--out", str(c.dir / "sw"), "--methods", "blac",
                "--trials", "1", "--write", str(c.file("mine/lrs.yaml", RECORDED)), *QUICK],
     expect=(RUN,), check=sweep_other_method_kept, timeout=240)

# ----------------------------------------------------------------------------- sweep_lrwd
def lrwd(*extra):
    return lambda c: ["--out", str(c.dir / "lw"), "--steps", "2", *extra]


case("sweep_lrwd --steps 0", "sweep_lrwd", "sweep_lrwd", lrwd("--steps", "0"),
     mentions=("--steps",))
case("sweep_lrwd --lr -1", "sweep_lrwd", "sweep_lrwd", lrwd("--lr", "-1"), mentions=("--lr",))
case("sweep_lrwd --span -1", "sweep_lrwd", "sweep_lrwd", lrwd("--span", "-1"),
     mentions=("--span",))
case("sweep_lrwd --noise-seeds 0", "sweep_lrwd", "sweep_lrwd", lrwd("--noise-seeds", "0"),
     mentions=("--noise-seeds",))
case("sweep_lrwd --wd inf", "sweep_lrwd", "sweep_lrwd", lrwd("--wd", "inf"), mentions=("--wd",))
case("sweep_lrwd --num-heads 3 --num-kv-heads 2", "sweep_lrwd", "sweep_lrwd",
     lrwd("--num-heads", "3", "--num-kv-heads", "2"), mentions=("heads",))
case("sweep_lrwd --out a file", "sweep_lrwd", "sweep_lrwd",
     lambda c: ["--out", str(c.guard(c.file("lw", "x"))), "--steps", "2"], mentions=("lw",))
case("sweep_lrwd --task unknown", "sweep_lrwd", "sweep_lrwd", lrwd("--task", "zzz"),
     mentions=("zzz",))

# ----------------------------------------------------------------------------- autolrs
case("autolrs bad lr", "autolrs", "autolrs", lambda c: c.fin("optim.lr=.nan"),
     mentions=("optim.lr",))
case("autolrs unknown key", "autolrs", "autolrs", lambda c: c.fin("autolrs.nothing=1"),
     mentions=("autolrs",))
case("autolrs no --config", "autolrs", "autolrs", lambda c: [], mentions=("--config",))

# ----------------------------------------------------------------------------- evidence
case("evidence unknown part", "evidence", "evidence", lambda c: ["everything"],
     mentions=("everything",))
case("evidence --shard 3/2", "evidence", "evidence",
     lambda c: ["stability", "--out", str(c.dir / "ev"), "--shard", "3/2"], mentions=("--shard",))
case("evidence --shard words", "evidence", "evidence",
     lambda c: ["stability", "--out", str(c.dir / "ev"), "--shard", "a/b"], mentions=("--shard",))
case("evidence --shard 0/0", "evidence", "evidence",
     lambda c: ["stability", "--out", str(c.dir / "ev"), "--shard", "0/0"], mentions=("--shard",))
case("evidence --seeds 0", "evidence", "evidence",
     lambda c: ["stability", "--out", str(c.dir / "ev"), "--seeds", "0"], mentions=("--seeds",))
case("evidence report of nothing", "evidence", "evidence",
     lambda c: ["report", "--out", str(c.dir / "ev"), "--report-dir", str(c.dir / "rep")],
     mentions=("ev",))
case("evidence bad override", "evidence", "evidence",
     lambda c: ["stability", "--out", str(c.dir / "ev"), "optim.lr=-1"], mentions=("optim.lr",))

# ----------------------------------------------------------------------------- pretrain_base
def pre(*extra):
    return lambda c: ["--out", str(c.dir / "base"), "--steps", "2", *extra]


case("pretrain --steps 0", "pretrain_base", "pretrain_base", pre("--steps", "0"),
     mentions=("--steps",))
case("pretrain --vocab-size 0", "pretrain_base", "pretrain_base", pre("--vocab-size", "0"),
     mentions=("--vocab-size",))
case("pretrain --num-heads 3", "pretrain_base", "pretrain_base", pre("--num-heads", "3"),
     mentions=("heads",))
case("pretrain --gsm8k-share 2", "pretrain_base", "pretrain_base", pre("--gsm8k-share", "2"),
     mentions=("--gsm8k-share",))
case("pretrain --lr nan", "pretrain_base", "pretrain_base", pre("--lr", "nan"),
     mentions=("--lr",))


def pre_nonempty(c: Ctx):
    c.guard(c.file("base/keep.txt", "mine"))
    return ["--out", str(c.dir / "base"), "--steps", "2"]


case("pretrain --out non-empty", "pretrain_base", "pretrain_base", pre_nonempty,
     mentions=("base",))


# ============================================================================= the runner
def first_message(rc: int, out: str, err: str) -> str:
    """The error line (with the first problem it lists), else the run's last line."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "error" in ln.lower() or "Traceback" in ln:
            if ln.endswith(":") and i + 1 < len(lines):
                ln = f"{ln} {lines[i + 1]}"
            return ln[:240]
    if rc == 0:
        outl = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if outl:
            return outl[-1][:200]
    return (lines[-1] if lines else "")[:200]


def execute(c: Case, ctx: Ctx, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu", **c.env}
    env.pop("HACBO_TRACEBACK", None)
    cmd = [PYTHON, "-m", f"train.{c.entry}", *argv]
    t0 = time.monotonic()
    out_path, err_path = ctx.dir / ".stdout", ctx.dir / ".stderr"
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        proc = subprocess.Popen(cmd, cwd=ctx.dir, env=env, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = signalled = False
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if c.signal_on and not signalled and (ctx.dir / c.signal_on[1]).exists():
                time.sleep(0.5)
                proc.send_signal(c.signal_on[0])
                signalled = True
            if time.monotonic() - t0 > c.timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    out = out_path.read_text(errors="replace")
    err = err_path.read_text(errors="replace")
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "timed_out": timed_out,
            "seconds": round(time.monotonic() - t0, 1), "cmd": cmd}


def classify(c: Case, ctx: Ctx, r: dict, fresh_before: bool) -> tuple[str, str]:
    rc, err = r["rc"], r["stderr"]
    if r["timed_out"]:
        return PROBLEM, f"hang: killed after {c.timeout:.0f} s"
    if "Traceback (most recent call last)" in err or "Traceback" in r["stdout"]:
        return PROBLEM, "traceback"
    for path, digest in ctx.guarded.items():
        if not (path.exists() or path.is_symlink()) or tree_digest(path) != digest:
            return PROBLEM, f"{path.name} was changed or removed"
    if c.check is not None and rc in (0, *c.codes):
        why = c.check(ctx, r)
        if why:
            return PROBLEM, why
    if rc == 2:
        if REFUSAL not in c.expect:
            return PROBLEM, "refused valid input"
        msg = first_message(rc, r["stdout"], err)
        if "error" not in err.lower():
            return PROBLEM, "exit 2 without an error message"
        missing = [m for m in c.mentions if m.lower() not in err.lower()]
        if missing:
            return PROBLEM, f"the message does not name {missing}"
        if c.fresh_out and fresh_before and c.entry in ("finetune", "autolrs") and ctx.out.exists():
            return PROBLEM, "refused but wrote into output_dir"
        return REFUSAL, ""
    if rc == 0:
        if RUN in c.expect:
            return RUN, ""
        return PROBLEM, "exit 0 on bad input (silently accepted)"
    if rc in (3, 4, 130, 143):
        if CODE in c.expect and rc in c.codes:
            return CODE, ""
        return PROBLEM, f"exit {rc} where {c.expect} was expected"
    return PROBLEM, f"undocumented exit status {rc}"


def run_case(c: Case, fixtures: Path, root: Path, index: int) -> dict:
    ctx = Ctx(Path(tempfile.mkdtemp(prefix=f"case{index:03d}-", dir=root)), fixtures)
    try:
        argv = c.args(ctx)
    except Exception as e:  # the harness's own setup failed: report it, never hide it
        return {"case": c.name, "category": c.category, "entry": c.entry, "rc": None,
                "class": PROBLEM, "problem": f"harness setup failed: {e!r}", "message": "",
                "seconds": 0.0, "argv": []}
    fresh_before = not ctx.out.exists()
    r = execute(c, ctx, argv)
    klass, why = classify(c, ctx, r, fresh_before)
    result = {
        "case": c.name, "category": c.category, "entry": f"train.{c.entry}", "rc": r["rc"],
        "class": klass, "problem": why, "message": first_message(r["rc"], r["stdout"], r["stderr"]),
        "seconds": r["seconds"], "argv": [str(a) for a in argv],
    }
    if klass == PROBLEM:
        result["stderr_tail"] = r["stderr"][-3000:]
    for p in ctx.dir.rglob("*"):  # let the clean-up remove read-only directories
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)
    shutil.rmtree(ctx.dir, ignore_errors=True)
    return result


def build_fixtures(root: Path) -> Path:
    """A finished run (checkpoints of steps 1 and 2) that cases copy."""
    fixtures = root / "fixtures"
    fixtures.mkdir()
    run = fixtures / "finished_run"
    cmd = [PYTHON, "-m", "train.finetune", "--config", "tiny_cpu",
           *merged([f"output_dir={run}", *QUICK], ["checkpoint.every=1", "checkpoint.keep=2"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=fixtures, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise SystemExit(f"could not build the finished-run fixture:\n{p.stderr[-3000:]}")
    return fixtures


def markdown_summary(payload: dict, args) -> str:
    classes = [REFUSAL, RUN, CODE, PROBLEM]
    lines = [
        "# Hostile-input round of the command lines",
        "",
        f"{payload['cases']} cases against the real entry points (subprocesses, one at a time), "
        f"{payload['started']}, {payload['duration_s'] / 60:.0f} min on this machine. "
        "Reproduce with:",
        "",
        "```bash",
        f".venv-test/bin/python scripts/hostile_round.py --out /tmp/hostile.json"
        + (f" --only {args.only!r}" if args.only else ""),
        "```",
        "",
        "Classes: `clean-refusal` = exit 2, one `PROG: error:` message naming the key or file, "
        "no traceback, nothing written; `clean-run` = exit 0 on odd but valid input; "
        "`documented-code` = 3/4/130/143 where documented; `PROBLEM` = traceback, hang, exit 1, "
        "exit 0 on nonsense, valid input refused, or a file changed or lost. Every case, its "
        "command line, exit status and message: `results/hostile_round.json`.",
        "",
        "| category | cases | " + " | ".join(classes) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in classes) + " |",
    ]
    for cat, counts in payload["by_category"].items():
        lines.append(f"| {cat} | {sum(counts.values())} | "
                     + " | ".join(str(counts.get(k, 0)) for k in classes) + " |")
    total = payload["counts"]
    lines.append(f"| **all** | **{payload['cases']}** | "
                 + " | ".join(f"**{total.get(k, 0)}**" for k in classes) + " |")
    problems = [r for r in payload["results"] if r["class"] == PROBLEM]
    lines += ["", "Problems: " + (", ".join(f"{r['case']} ({r['problem']})" for r in problems)
                                  if problems else "none.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/hostile_round.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results file (must not exist)")
    parser.add_argument("--only", default=None, help="run only the cases whose name or category contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="parallel cases (only 1)")
    parser.add_argument("--markdown", default=None,
                        help="also write a summary table (categories x classes) here (must not exist)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only is None
             or args.only.lower() in (c.name + " " + c.category + " " + c.entry).lower()]
    if args.list:
        for c in cases:
            print(f"{c.category:18} {c.entry:18} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    if args.jobs != 1:
        parser.error("-j: cases run one at a time (-j 1): a run takes both cores")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {str(out)!r} already exists; choose another path")
    if not out.parent.is_dir():
        parser.error(f"--out {str(out)!r}: {out.parent} is not a directory")
    if args.markdown is not None and Path(args.markdown).exists():
        parser.error(f"--markdown {args.markdown!r} already exists; choose another path")
    names = [c.name for c in CASES]
    if len(set(names)) != len(names):
        parser.error("two cases share a name")
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    results = []
    try:
        t0 = time.monotonic()
        fixtures = build_fixtures(root)
        print(f"fixture run built in {time.monotonic() - t0:.0f} s", flush=True)
        print(f"{'case':58} {'entry point':26} {'rc':>4} {'class':16} message")
        for i, c in enumerate(cases):
            r = run_case(c, fixtures, root, i)
            results.append(r)
            msg = r["problem"] + (": " if r["problem"] else "") + r["message"]
            print(f"{c.name[:58]:58} {r['entry'][:26]:26} {str(r['rc']):>4} {r['class']:16} "
                  f"{msg[:110]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts: dict[str, int] = {}
    by_category: dict[str, dict[str, int]] = {}
    for r in results:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
        cat = by_category.setdefault(r["category"], {})
        cat[r["class"]] = cat.get(r["class"], 0) + 1
    print(f"\n{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for cat, cc in by_category.items():
        print(f"  {cat:18} " + ", ".join(f"{k} {v}" for k, v in sorted(cc.items())))
    problems = [r for r in results if r["class"] == PROBLEM]
    for r in problems:
        print(f"PROBLEM {r['case']}: {r['problem']} -- {r['message']}")
    payload = {
        "command": ".venv-test/bin/python scripts/hostile_round.py --out " + str(args.out)
        + (f" --only {args.only!r}" if args.only else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started),
        "cases": len(results),
        "counts": counts,
        "by_category": by_category,
        "results": results,
    }
    with open(out, "x") as f:  # never overwrite
        json.dump(payload, f, indent=1, ensure_ascii=False)
    print(f"wrote {out}")
    if args.markdown is not None:
        with open(args.markdown, "x") as f:
            f.write(markdown_summary(payload, args))
        print(f"wrote {args.markdown}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
