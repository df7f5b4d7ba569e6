"""HVP curvature probe of a Qwen3 checkpoint (console script ``hacbo-probe-curvature``).

    hacbo-probe-curvature MODEL_DIR --out DIR [--hacbo-state PATH] [--data PATH.npz] [--overwrite]

Per (block, sub-module) of the Qwen3 labels (``qwen3_labels``): top Hessian eigenvalue, Hutchinson
trace, RMS gradient and, with ``--hacbo-state``, HACBO's curvature EMA; then Spearman correlations
with permutation p-values (:mod:`hacbo_jax.experiments.curvature.probe`). Writes ``curvature.csv``,
``curvature.json`` and ``curvature.png`` under ``--out`` (``--prefix`` names them; files of an
earlier probe with the same prefix are refused unless ``--overwrite``).

The loss is the mean next-token cross-entropy over the real tokens of a fixed probe batch: the
``--data`` .npz (``input_ids`` and optionally ``attention_mask``, int [R, L]), or by default
``--rows`` rows of ``--seq-len`` tokens packed from the synthetic task's train documents (seed
``--seed``), tokenised with the tokenizer in MODEL_DIR. The model/data glue is the two functions
``load_model_and_loss`` and ``load_probe_batch`` below and nothing else.
"""

from __future__ import annotations

import argparse
import math
import zipfile
import json
from pathlib import Path

import numpy as np

from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overwrite_argument,
    check_output_target,
    cli_main,
)

_MAGIC = {b"\x93NUMPY": ".npy", b"PK\x03\x04": ".npz (zip)", b"\x80": "pickle"}


def _what_is(path: Path) -> str:
    """A few words on what the file at ``path`` holds, for an error message."""
    head = path.read_bytes()[:512]
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return f"a {kind} file"
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of unknown format"
    return "a text file"


def _load_numpy(path: Path, option: str, expected: str):
    """``np.load`` with an error that says what was expected and what the file is."""
    try:
        return np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy calls anything unknown "pickled data"
        raise ValueError(
            f"{option} {str(path)!r}: expected {expected}, but it is {_what_is(path)}"
        ) from e


def load_probe_batch(model_dir: Path, data: str | None, rows: int, seq_len: int, seed: int):
    """(input_ids int32[R, L], attention_mask int32[R, L]) of the probe set."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"--data {data!r} is not a file")
        with _load_numpy(path, "--data", "a .npz of numpy arrays (np.savez)") as arrays:
            if not hasattr(arrays, "files"):
                raise ValueError(f"--data {data!r}: expected a .npz of arrays, got a single .npy")
            if "input_ids" not in arrays:
                raise ValueError(f"--data {data!r} has no 'input_ids' array (has {list(arrays)})")
            ids = np.asarray(arrays["input_ids"], np.int32)
            mask = np.asarray(arrays.get("attention_mask", np.ones_like(ids)), np.int32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"--data needs input_ids [R, L] and a mask of the same shape; got {ids.shape} "
                f"and {mask.shape}"
            )
        return ids, mask
    from hacbo_jax.trainer.pretrain_base import document_texts, pack_documents
    from hacbo_jax.data.synthetic import SyntheticTask
    from hacbo_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    examples = SyntheticTask("arith-small", seed=seed).examples("train", rows * seq_len // 40 + 50)
    tokens = tokenizer(document_texts(examples), add_special_tokens=False)["input_ids"]
    ids, mask, _ = pack_documents(
        tokens, seq_len, rows, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    return ids, mask


def load_model_and_loss(model_dir: Path, ids: np.ndarray, mask: np.ndarray):
    """(params, labels, loss_fn params -> scalar) of the Qwen3 checkpoint on the probe batch."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
    from hacbo_jax.trainer.recipes import qwen3_labels

    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    return params, qwen3_labels(params), loss_fn


def load_curvature(path: str) -> np.ndarray:
    """HACBO's curvature EMA c[B, M] from a .npy, a .npz or .json with key ``curvature``, or an
    orbax checkpoint step directory (``RUN/checkpoints/<step>``) whose state holds a HACBOState."""
    source = Path(path)
    if source.is_dir():
        import orbax.checkpoint as ocp

        item = source / "state" if (source / "state").is_dir() else source
        try:
            state = ocp.StandardCheckpointer().restore(item.absolute())
        except Exception as e:  # orbax raises many types; one message names the directory
            raise ValueError(f"cannot read an orbax checkpoint in {str(item)!r}: {e}") from e
        import jax

        found = [
            leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
            if str(getattr(key_path[-1], "key", getattr(key_path[-1], "name", ""))) == "curvature"
        ]
        if len(found) != 1:
            raise ValueError(f"expected one 'curvature' array in {str(item)!r}, found {len(found)}")
        return np.asarray(found[0], np.float64)
    if not source.is_file():
        raise ValueError(f"--hacbo-state {path!r} is neither a file nor a checkpoint directory")
    expected = "a .npy, .npz or .json state file"
    if source.suffix == ".npy":
        array = _load_numpy(source, "--hacbo-state", f"{expected} (np.save)")
        if not isinstance(array, np.ndarray):
            array.close()
            raise ValueError(f"--hacbo-state {path!r}: a .npz archive named .npy; rename it .npz")
        return array
    if source.suffix == ".npz":
        with _load_numpy(source, "--hacbo-state", f"{expected} (np.savez)") as arrays:
            if "curvature" not in arrays:
                raise ValueError(f"--hacbo-state {path!r} has no 'curvature' array")
            return np.asarray(arrays["curvature"])
    if source.suffix == ".json":
        try:
            document = json.loads(source.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"--hacbo-state {path!r}: expected {expected}, but it is {_what_is(source)} "
                f"that is not JSON ({e})"
            ) from None
        if not isinstance(document, dict) or "curvature" not in document:
            raise ValueError(f"--hacbo-state {path!r} has no top-level 'curvature' list")
        return np.asarray(document["curvature"], np.float64)
    raise ValueError(
        f"--hacbo-state {path!r}: expected a .npy, .npz or .json state file or a checkpoint "
        f"directory, but it is {_what_is(source)} named {source.suffix or 'without a suffix'}"
    )


def parse_args(argv=None, prog: str = "hacbo-probe-curvature") -> argparse.Namespace:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="Hugging Face Qwen3 checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--prefix", default="curvature", help="output file name prefix")
    parser.add_argument("--hacbo-state", default=None, help="HACBO curvature EMA (see docs)")
    parser.add_argument("--data", default=None, help=".npz with input_ids [R, L] (+ mask)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", choices=("submodules", "blocks"), default="submodules")
    parser.add_argument("--trace-mode", choices=("per_group", "shared"), default="per_group")
    parser.add_argument("--hvp-form", choices=("restricted", "masked"), default="restricted")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--trace-tol", type=float, default=1e-3)
    parser.add_argument("--trace-max-probes", type=int, default=100)
    parser.add_argument("--n-resamples", type=int, default=10_000)
    add_overwrite_argument(parser, "an earlier probe's files (same --prefix) in --out")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from hacbo_jax.experiments.curvature.probe import probe_curvature, rank_correlations, write_outputs

    model_dir = Path(args.model_dir)
    if model_dir.is_file():
        raise ValueError(
            f"MODEL_DIR {args.model_dir!r} is a file, not a checkpoint directory (with config.json)"
        )
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{args.model_dir!r} is not a checkpoint directory (no config.json)")
    for name in ("rows", "seq_len", "max_iters", "trace_max_probes", "n_resamples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("tol", "trace_tol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a finite number > 0")
    if "/" in args.prefix or args.prefix in ("", ".", ".."):
        raise ValueError(f"--prefix {args.prefix!r}: must be a file name, not a path")
    out = check_output_target(
        args.out,
        overwrite=getattr(args, "overwrite", False),
        files=[f"{args.prefix}.{ext}" for ext in ("csv", "json", "png")],
    )
    curvature = None if args.hacbo_state is None else load_curvature(args.hacbo_state)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before the probe runs
    ids, mask = load_probe_batch(model_dir, args.data, args.rows, args.seq_len, args.seed)
    params, labels, loss_fn = load_model_and_loss(model_dir, ids, mask)
    rows = probe_curvature(
        loss_fn,
        params,
        labels,
        hacbo_state=curvature,
        groups=args.groups,
        submodules=("attn_qkv", "attn_out", "mlp", "ln"),
        seed=args.seed,
        tol=args.tol,
        max_iters=args.max_iters,
        trace_mode=args.trace_mode,
        trace_tol=args.trace_tol,
        trace_max_probes=args.trace_max_probes,
        hvp_form=args.hvp_form,
    )
    correlations = (
        rank_correlations(rows, n_resamples=args.n_resamples, seed=args.seed)
        if args.groups == "submodules"
        else []
    )
    metadata = {**vars(args), "probe_tokens": int(mask.sum()), "probe_shape": list(ids.shape)}
    paths = write_outputs(rows, correlations, args.out, prefix=args.prefix, metadata=metadata)
    for c in correlations:
        if c.scope in ("within_blocks", "pooled"):
            print(
                f"{c.scope:14s} {c.proxy:13s} vs {c.curvature:15s} rho {c.rho:+.3f} p {c.p_value:.3g}"
            )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {k: str(v) for k, v in paths.items()}


@cli_main
def main(argv=None, *, prog: str = "hacbo-probe-curvature") -> int:
    """Runs the tool; exit status 2 with a one-line message (no traceback) on bad input."""
    run(parse_args(argv, prog))
    return 0
