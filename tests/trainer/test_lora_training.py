"""LoRA in the training stack: ``lora.*`` config keys, adapters-only training (AdamW and the
controllers over the adapters), the run's ``adapter/`` (PEFT) and merged ``hf_model/`` exports,
resume, adapter dropout in the jitted step (a new mask per step and micro-batch, bit-exact
resume, nothing changed without dropout), the weight-gradient skip over adapters, and bad input
refused (exit 2) before any work."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.runs import CONFIG, quick_config, quick_overrides

from hacbo_jax.controllers import hacbo
from hacbo_jax.models.lora import add_lora, merge_lora, split_lora
from hacbo_jax.models.lora_peft import load_adapter, save_adapter
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer import finetune
from hacbo_jax.trainer import step as step_lib
from hacbo_jax.trainer.controller_registry import (
    AdaGradSelectConfig,
    build_controller,
    controller_idle_blocks,
)
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.run_parts import build_run
from hacbo_jax.trainer.step import (
    Batch,
    TrainState,
    WeightGradSkip,
    build_optimizer,
    learning_rate_schedule,
    make_loss_fn,
    make_train_step,
)

TWO_STEPS = ("optim.max_steps=2", "optim.warmup_steps=0", "checkpoint.every=1", "eval.limit=4")


def _params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in flat}


def test_lora_config_trains_the_adapters_grouped_by_block_and_submodule(tiny_model_dir, tmp_path):
    cfg = quick_config(
        tiny_model_dir,
        tmp_path / "run",
        "lora.rank=4",
        "lora.targets=q_proj,o_proj,mlp",
        "controller.kind=hacbo",
        *TWO_STEPS,
    )
    parts = build_run(cfg)
    assert parts.lora
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.State(parts.state.params))}
    assert paths and all("/lora/lora_" in p for p in paths)  # only adapters are trained
    labels = set(jax.tree.leaves(qwen3_labels(parts.state.params)))
    assert labels == {f"{i}/{g}" for i in range(2) for g in ("attn_qkv", "attn_out", "mlp")}
    base = nnx.to_flat_state(parts.rest)
    assert not any("lora" in "/".join(map(str, p)) for p, _ in base)
    merged = parts.model_at(parts.state.params)  # plain projections, equal to the base at B = 0
    reference = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    ids = np.arange(10).reshape(1, 10)
    np.testing.assert_allclose(merged(ids), reference(ids), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["none", "hacbo"])
def test_a_lora_run_changes_only_the_adapters_and_exports_both_forms(
    tiny_model_dir, tmp_path, controller
):
    run_dir = tmp_path / "run"
    extra = (
        "lora.rank=4",
        "lora.alpha=8",
        f"controller.kind={controller}",
        "controller.hacbo.interval=1",
        *TWO_STEPS,
    )
    summary = finetune.run(quick_config(tiny_model_dir, run_dir, *extra), show_progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    # the merged export = base + the saved adapter, merged; norms and embeddings untouched
    exported = _params(Qwen3ForCausalLM.from_pretrained(run_dir / "hf_model"))
    base_model = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    base = _params(base_model)
    rebuilt = _params(merge_lora(load_adapter(base_model, run_dir / "adapter")))
    assert exported.keys() == base.keys() == rebuilt.keys()
    changed = {k for k in base if not np.array_equal(base[k], exported[k])}
    assert changed and all(k.endswith("_proj/kernel") for k in changed)
    for k in base:
        np.testing.assert_allclose(exported[k], rebuilt[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_a_lora_run_resumes_to_the_same_adapters(tiny_model_dir, tmp_path):
    extra = (
        "lora.rank=2",
        "controller.kind=none",
        "optim.max_steps=3",
        "optim.warmup_steps=0",
        "checkpoint.every=1",
        "eval.limit=4",
        "eval.every_epoch=false",
    )
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finetune.run(quick_config(tiny_model_dir, straight, *extra), show_progress=False)
    cfg = quick_config(tiny_model_dir, stopped, *extra)
    assert "stopped_at" in finetune.run(cfg, show_progress=False, stop_after=1)
    assert not (stopped / "adapter").exists()
    finetune.run(cfg, resume=True, show_progress=False)
    from safetensors.numpy import load_file

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def _adapter(tmp_path, model_dir, rank: int):
    directory = tmp_path / f"adapter_r{rank}"
    save_adapter(add_lora(Qwen3ForCausalLM.from_pretrained(model_dir), rank), directory)
    return directory


def test_a_matching_adapter_is_the_runs_starting_point(tiny_model_dir, tmp_path):
    directory = _adapter(tmp_path, tiny_model_dir, 4)
    model = load_adapter(Qwen3ForCausalLM.from_pretrained(tiny_model_dir), directory)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v.set_value(v[...] + 0.05)  # nonzero B: the start is recognisably the adapter's
    save_adapter(model, directory)
    cfg = quick_config(
        tiny_model_dir,
        tmp_path / "run",
        "lora.rank=4",
        f"lora.adapter={directory}",
        "controller.kind=none",
        *TWO_STEPS,
    )
    parts = build_run(cfg)
    want = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_allclose, parts.state.params, want)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=0"], "lora.rank = 0: must be a value >= 1"),
        (["lora.rank=4", "lora.targets=q_proj,qkv"], "unknown LoRA target module(s) ['qkv']"),
        (["lora.rank=4", "lora.dropout=1.0"], "lora.dropout = 1.0: must be a value in [0, 1)"),
        (["lora.rank=4", "lora.dropout=-0.1"], "lora.dropout = -0.1: must be a value in [0, 1)"),
        (["lora.rank=40"], "LoRA rank 40 is larger than the smaller dimension of q_proj"),
        (["lora.adapter=ADAPTER"], "lora.adapter = "),
        (["lora.rank=2", "lora.adapter=ADAPTER"], "LoRA rank = 4, but the model's adapters have 2"),
        (["lora.rank=4", "lora.targets=attn", "lora.adapter=ADAPTER"], "LoRA targets = "),
        (["lora.rank=4", "lora.adapter=NOWHERE"], "is not a directory"),
    ],
)
def test_bad_lora_input_exits_2_before_any_work(
    tiny_model_dir, tmp_path, capsys, overrides, message
):
    directory = _adapter(tmp_path, tiny_model_dir, 4)
    overrides = [
        o.replace("ADAPTER", str(directory)).replace("NOWHERE", str(tmp_path / "nowhere"))
        for o in overrides
    ]
    run_dir = tmp_path / "run"
    args = quick_overrides(tiny_model_dir, run_dir, *overrides)
    try:  # a key's own check refuses while the command line is parsed (argparse's exit 2)
        status = finetune.main(["--config", str(CONFIG), *args])
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


# ---- adapter dropout in the jitted step ----------------------------------------------------

STEP_CFG = Qwen3Config(
    vocab_size=61,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    initializer_range=0.2,
)


def _lora_model(*, dropout: float, scan: bool = True, lora: bool = True):
    """A tiny model with rank-2 adapters everywhere and B != 0 (the adapters act)."""
    model = Qwen3ForCausalLM(STEP_CFG, scan_layers=scan, remat="full", rngs=nnx.Rngs(0))
    if lora:
        add_lora(model, 2, alpha=4, dropout=dropout, rngs=nnx.Rngs(1))
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            v.set_value(v[...] + 0.1)
    return model


def _batch(accum: int = 2, micro: int = 2, length: int = 9, seed: int = 0) -> Batch:
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, STEP_CFG.vocab_size, (accum, micro, length)).astype(np.int32)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[..., 2:-1] = 1.0
    arrays = (ids, np.ones_like(ids), np.roll(ids, -1, -1), loss_mask)
    return Batch(*(jnp.asarray(x) for x in arrays))


def _split(model, lora: bool):
    if lora:
        return split_lora(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def _step_and_state(model, *, peak_lr=1e-2, lora=True, controller=None, skip=None):
    graphdef, params, rest = _split(model, lora)
    schedule = learning_rate_schedule(peak_lr, 1, 100)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0, controller=controller
    )
    step = make_train_step(
        graphdef, rest, tx, schedule, dev_batch_size=1, uses_dev_grads=False, skip=skip,
        donate=False,
    )  # fmt: skip
    rng = jax.random.key_data(jax.random.key(0))
    return step, TrainState(jnp.int32(0), params, tx.init(params), rng), (graphdef, rest)


def _losses(model, batches, **kwargs) -> list[float]:
    step, state, _ = _step_and_state(model, **kwargs)
    dev = jax.tree.map(lambda x: x[0], batches[0])
    out = []
    for batch in batches:
        state, metrics = step(state, batch, dev)
        out.append(float(metrics.loss))
    return out


@pytest.mark.slow
def test_dropout_draws_new_masks_every_step_and_micro_batch():
    """Learning rate 0 (params fixed), one batch repeated: with dropout every step's training
    loss differs (a new mask per step), a step replayed from its state repeats its loss
    bitwise, and a micro-batch given twice in one step counts twice with different masks;
    without dropout all of these are equal."""
    batch = _batch()
    dev = jax.tree.map(lambda x: x[0], batch)
    one = _batch(accum=1)
    twice = jax.tree.map(lambda x: jnp.concatenate([x, x]), one)  # [A, A]: accumulation 2
    for dropout in (0.5, 0.0):
        step, state, _ = _step_and_state(_lora_model(dropout=dropout), peak_lr=0.0)
        start, losses = state, []
        for _ in range(3):
            state, metrics = step(state, batch, dev)
            losses.append(float(metrics.loss))
        replayed = float(step(start, batch, dev)[1].loss)
        loss_once = float(step(start, one, dev)[1].loss)
        loss_twice = float(step(start, twice, dev)[1].loss)
        assert replayed == losses[0]
        if dropout:
            assert len(set(losses)) == 3, losses
            assert loss_once != loss_twice  # micro-batch 1 drew another mask than micro-batch 0
        else:
            assert len(set(losses)) == 1, losses
            np.testing.assert_allclose(loss_twice, loss_once, rtol=1e-6)


@pytest.mark.slow
def test_the_loss_without_a_key_is_deterministic():
    """Evaluation and the dev gradients call the loss without a key: a model with dropout then
    computes exactly what the same adapters without dropout compute."""
    batch = jax.tree.map(lambda x: x[0], _batch())
    values = []
    for dropout in (0.5, 0.0):
        graphdef, params, rest = split_lora(_lora_model(dropout=dropout))
        loss_fn = jax.jit(make_loss_fn(graphdef, rest))
        values.append(loss_fn(params, batch))
    jax.tree.map(np.testing.assert_array_equal, values[0], values[1])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_without_dropout_the_step_never_builds_the_dropout_path(monkeypatch, lora):
    """A model without adapter dropout (LoRA at rate 0, or full fine-tuning) gets the step it
    got before dropout existed: the key derivation and the key setting are never traced (they
    would raise here), and the results equal the unpatched step's bitwise."""
    batches = [_batch(seed=s) for s in range(3)]
    want = _losses(_lora_model(dropout=0.0, lora=lora), batches, lora=lora)

    def never(*args, **kwargs):
        raise AssertionError("the dropout path was built")

    monkeypatch.setattr(step_lib, "step_dropout_key", never)
    monkeypatch.setattr(step_lib, "set_dropout_key", never)
    got = _losses(_lora_model(dropout=0.0, lora=lora), batches, lora=lora)
    assert got == want
    with pytest.raises(AssertionError, match="dropout path was built"):
        _losses(_lora_model(dropout=0.1), batches)


@pytest.mark.slow
def test_a_dropout_run_resumes_bit_exactly(tiny_model_dir, tmp_path):
    """``lora.dropout=0.1`` on scanned layers: 4 steps straight and 2 + resume 2 end with the
    same adapters, bit for bit (the masks follow the checkpointed PRNG state), and the masks
    acted (the adapters differ from a run without dropout)."""
    extra = ("lora.rank=2", "lora.dropout=0.1", "model.scan_layers=true", "controller.kind=none",
             "optim.max_steps=4", "optim.warmup_steps=0", "checkpoint.every=1", "eval.limit=2",
             "eval.every_epoch=false")  # fmt: skip
    straight, stopped, plain = tmp_path / "straight", tmp_path / "stopped", tmp_path / "plain"
    summary = finetune.run(quick_config(tiny_model_dir, straight, *extra), show_progress=False)
    assert summary["steps"] == 4 and np.isfinite(summary["final_train_loss"])
    cfg = quick_config(tiny_model_dir, stopped, *extra)
    assert "stopped_at" in finetune.run(cfg, show_progress=False, stop_after=2)
    finetune.run(cfg, resume=True, show_progress=False)
    finetune.run(
        quick_config(tiny_model_dir, plain, *extra, "lora.dropout=0.0"), show_progress=False
    )
    from safetensors.numpy import load_file

    a, b, c = (
        load_file(d / "adapter" / "adapter_model.safetensors") for d in (straight, stopped, plain)
    )
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    config = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1


# ---- the weight-gradient skip over adapters ------------------------------------------------


def _adagradselect_run(compute: bool, dropout: float = 0.0):
    """Five LoRA steps of AdaGradSelect (pct 0.25, after its epsilon steps) with the skip
    (``compute=True``) or the dense gradient zeroed over the idle blocks (the reference)."""
    model = _lora_model(dropout=dropout)
    labels = qwen3_labels(split_lora(model)[1])
    hyper, run_args = AdaGradSelectConfig(pct=0.25), {"steps_per_epoch": 2, "seed": 0}
    controller = build_controller("adagradselect", labels, hyper, **run_args)
    idle = controller_idle_blocks("adagradselect", hyper, STEP_CFG.num_hidden_layers, **run_args)
    skip = WeightGradSkip(idle, labels, compute=compute)
    step, state, _ = _step_and_state(model, controller=controller, skip=skip)
    dev = jax.tree.map(lambda x: x[0], _batch())
    states, idle_seen = [], []
    for seed in range(5):
        idle_seen.append(np.asarray(idle(state.opt_state)))
        state, metrics = step(state, _batch(seed=seed), dev)
        assert bool(metrics.finite)
        states.append(jax.device_get(state))
    return states, np.stack(idle_seen)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.slow
def test_skipping_weight_grads_with_lora_equals_the_zeroed_dense_step(dropout):
    """LoRA + AdaGradSelect with ``skip_weight_grads``: bitwise the dense step that zeroes the
    idle blocks. The frozen base has no weight gradient to skip and the adapters' gradients
    are computed either way (rank-r products), so the skip only zeroes them."""
    skipped, idle = _adagradselect_run(True, dropout)
    reference, reference_idle = _adagradselect_run(False, dropout)
    np.testing.assert_array_equal(idle, reference_idle)
    assert idle.any() and not idle.all()
    for got, want in zip(skipped, reference):
        jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_a_lora_config_with_the_skip_trains(tiny_model_dir, tmp_path):
    """``controller.skip_weight_grads=true`` with ``lora.rank`` and dropout: the run's own
    steps carry the skip and take finite steps over the adapters."""
    cfg = quick_config(
        tiny_model_dir, tmp_path / "run", "lora.rank=4", "lora.dropout=0.1",
        "controller.kind=adagradselect", "controller.skip_weight_grads=true", *TWO_STEPS,
    )  # fmt: skip
    parts = build_run(cfg)
    assert parts.lora
    before = jax.device_get(parts.state.params)  # the step donates its state
    state, dev = parts.state, parts.device_dev_buffer()
    for _ in range(2):
        batch, _ = parts.device_batch(parts.sampler.next_indices())
        state, metrics = parts.train_steps.ordinary(state, batch, dev)
        assert bool(metrics.finite) and np.isfinite(float(metrics.loss))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state.params))
    assert any(jax.tree.leaves(moved))


def _embedded_leaves(text: str, tree) -> list[str]:
    """Paths of the leaves of ``tree`` whose bytes appear as a literal constant in ``text`` (a
    lowered program's StableHLO, which prints array constants as ``dense<"0x<hex>">``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        jax.tree_util.keystr(path)
        for path, leaf in flat
        if np.asarray(leaf).size > 1 and np.asarray(leaf).tobytes().hex().upper() in text
    ]


@pytest.mark.parametrize(
    "program",
    [
        "ordinary",
        *(
            pytest.param(p, marks=pytest.mark.slow)
            for p in ("dev_signs", "measurement", "one_program")
        ),
    ],
)
def test_the_frozen_base_is_an_argument_of_the_compiled_step_not_a_constant(program):
    """A closed-over array is a constant of the jitted program: the whole frozen base (1.2 GB of
    bf16 on Qwen3-0.6B) would be copied into every compiled step. The steps and the dev program
    take it as an argument instead, so none of its arrays appears in the lowered programs, and
    they still run."""
    model = _lora_model(dropout=0.0)
    graphdef, params, rest = split_lora(model)
    schedule = learning_rate_schedule(1e-2, 1, 100)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0,
        controller=hacbo(qwen3_labels(params), interval=1),
    )  # fmt: skip
    key = jax.random.key_data(jax.random.key(0))
    state = TrainState(jnp.int32(0), params, tx.init(params), key)
    batch = _batch()
    dev = jax.tree.map(lambda x: x[0], batch)
    make = lambda **kw: make_train_step(
        graphdef, rest, tx, schedule, dev_batch_size=1, donate=False, **kw
    )
    if program == "dev_signs":
        fn = step_lib.make_dev_signs_fn(graphdef, rest, dev_batch_size=1)
        args = (state, dev)
    elif program == "measurement":
        signs = step_lib.make_dev_signs_fn(graphdef, rest, dev_batch_size=1)(state, dev)
        fn = make(uses_dev_grads=True, dev_signs_argument=True)
        args = (state, batch, dev, signs)
    else:
        fn = make(uses_dev_grads=program == "one_program")
        args = (state, batch, dev)
    assert len(jax.tree.leaves(rest)) > 10
    assert _embedded_leaves(fn.lower(*args).as_text(), rest) == []
    out = fn(*args)
    if program != "dev_signs":
        assert int(out[0].step) == 1 and np.isfinite(float(out[1].loss))
