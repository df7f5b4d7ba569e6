"""LoRA adapters on the Qwen3 port: behaviour of the wrapper and PEFT parity both ways.

Tiny shapes throughout; the PEFT references are torch models on the same checkpoints. The
parity figures (max abs logit difference, float32) are printed with ``-s``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft  # test extras: the reference must never skip silently
import pytest
import torch
import transformers
from flax import nnx

from hacbo_jax.models.lora import (
    BASE_PARAMS,
    LoRALinear,
    add_lora,
    has_lora,
    lora_modules,
    lora_settings,
    merge_lora,
    resolve_targets,
    set_dropout_key,
    split_lora,
    uses_dropout,
)
from hacbo_jax.models.lora_peft import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_adapter,
    save_adapter,
)
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

PARITY_ATOL = 1e-4
CONFIG = Qwen3Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 7)))


def _model(scan: bool = False, **kwargs) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(CONFIG, scan_layers=scan, rngs=nnx.Rngs(0), **kwargs)


def _randomise_b(model: Qwen3ForCausalLM, seed: int = 7, scale: float = 0.2) -> None:
    """Nonzero B everywhere, so the adapters change the output."""
    key = jax.random.key(seed)
    for _, _, module in lora_modules(model):
        key, sub = jax.random.split(key)
        b = module.lora.lora_b
        b.set_value(scale * jax.random.normal(sub, b.shape, b.dtype))


def _lora_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


# ---- the wrapper --------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_new_adapters_leave_the_model_equal_to_its_base(scan):
    model = _model(scan)
    before = model(IDS)
    add_lora(model, 4, alpha=8, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(model(IDS), before, atol=1e-6, rtol=0)
    for _, _, module in lora_modules(model):
        assert not np.any(module.lora.lora_b[...])  # B = 0
        assert np.any(module.lora.lora_a[...])  # A random (kaiming-uniform, bound 1/sqrt(in))
        bound = 1 / np.sqrt(module.lora.lora_a.shape[-2])
        assert np.abs(module.lora.lora_a[...]).max() <= bound


def test_adapter_params_are_a_distinct_variable_type_with_flat_lora_shapes():
    model = add_lora(_model(), 3, targets="q_proj,o_proj,mlp")
    lora = _lora_params(model)["model"]["layers"][0]
    assert set(lora["self_attn"]) == {"q_proj", "o_proj"}
    assert set(lora["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    q = lora["self_attn"]["q_proj"]["lora"]
    assert q["lora_a"].shape == (32, 3) and q["lora_b"].shape == (3, 4 * 8)  # [D, r], [r, N*H]
    o = lora["self_attn"]["o_proj"]["lora"]
    assert o["lora_a"].shape == (4 * 8, 3) and o["lora_b"].shape == (3, 32)
    base = nnx.to_flat_state(nnx.state(model, BASE_PARAMS))
    assert not any("lora" in "/".join(map(str, path)) for path, _ in base)
    assert lora_settings(model).targets == ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_scanned_adapters_are_stacked_per_layer_with_independent_draws():
    model = add_lora(_model(scan=True), 4, targets="attn")
    a = _lora_params(model)["model"]["layers"]["self_attn"]["k_proj"]["lora"]["lora_a"]
    assert a.shape == (2, 32, 4)
    assert not np.allclose(a[0], a[1])


@pytest.mark.slow
def test_scan_and_unrolled_models_with_the_same_adapter_agree(tmp_path):
    base = _model()
    base.save_pretrained(tmp_path / "base")  # the same base weights, stacked on load
    unrolled = add_lora(base, 4, alpha=16)
    _randomise_b(unrolled)
    save_adapter(unrolled, tmp_path / "adapter")
    scanned = Qwen3ForCausalLM.from_pretrained(tmp_path / "base", scan_layers=True)
    load_adapter(scanned, tmp_path / "adapter")
    np.testing.assert_allclose(scanned(IDS), unrolled(IDS), atol=1e-5, rtol=0)
    assert lora_settings(scanned) == lora_settings(unrolled)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_model_computes_the_unmerged_forward(scan):
    model = add_lora(_model(scan), 4, alpha=8)
    _randomise_b(model)
    unmerged = model(IDS)
    merge_lora(model)
    assert not has_lora(model)
    assert not _lora_params(model)
    np.testing.assert_allclose(model(IDS), unmerged, atol=1e-5, rtol=0)


def test_merging_a_model_from_a_training_state_leaves_that_state_unchanged():
    model = add_lora(_model(), 4)
    _randomise_b(model)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(rest))
    merge_lora(nnx.merge(graphdef, lora, rest))
    after = nnx.to_pure_dict(rest)
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_a_training_step_changes_only_the_adapters(scan):
    model = add_lora(_model(scan, remat="full"), 4)
    graphdef, params, rest = split_lora(model)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    def loss(params):
        m = nnx.merge(graphdef, nnx.State(params), rest)
        logits = m(IDS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(rest))
    grads = jax.grad(loss)(params)
    # B = 0 at the start: only B gets a gradient (dL/dA = x^T dL/dy B^T = 0)
    for a, b in _pairs(grads):
        assert not np.any(a) and np.any(b)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    assert float(loss(new)) < float(loss(params))
    jax.tree.map(np.testing.assert_array_equal, base_before, nnx.to_pure_dict(rest))


def _pairs(tree):
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.State(tree))}
    return [(flat[k], flat[k[: -len("lora_a")] + "lora_b"]) for k in flat if k.endswith("lora_a")]


@pytest.mark.slow
def test_packed_rows_and_remat_give_the_plain_forward_and_gradient():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])

    def grads_of(remat):
        model = add_lora(_model(remat=remat), 2, rngs=nnx.Rngs(3))
        _randomise_b(model)
        graphdef, lora, rest = split_lora(model)

        def loss(p):
            return nnx.merge(graphdef, nnx.State(p), rest)(IDS, segment_ids=seg).sum()

        return jax.value_and_grad(loss)(lora)

    (plain, g_plain), (dots, g_dots) = grads_of("none"), grads_of("dots")
    np.testing.assert_allclose(dots, plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_dots, g_plain)
    # the second segment of row 0 does not see the first: same as that segment alone
    model = add_lora(_model(), 2, rngs=nnx.Rngs(3))
    _randomise_b(model)
    packed = model(IDS, segment_ids=seg)[0, 3:6]
    alone = model(IDS[:1, 3:6])[0]
    np.testing.assert_allclose(packed, alone, atol=1e-5)


def test_base_can_be_held_in_bfloat16_with_float32_adapters():
    model = add_lora(_model(), 4, base_dtype=jnp.bfloat16)
    base = nnx.to_flat_state(nnx.state(model, BASE_PARAMS))
    assert {v[...].dtype for _, v in base} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(_lora_params(model))} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(model(IDS)))


def _with_dropout(scan: bool, rate: float = 0.5, **kwargs) -> Qwen3ForCausalLM:
    model = add_lora(_model(scan, **kwargs), 4, dropout=rate, rngs=nnx.Rngs(1))
    _randomise_b(model)
    return model


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dropout_acts_only_with_a_key_and_draws_a_mask_per_key(scan):
    model = _with_dropout(scan)
    assert uses_dropout(model)
    plain = model(IDS)  # no key: deterministic
    np.testing.assert_array_equal(model(IDS), plain)
    key = jax.random.key(3)
    first = set_dropout_key(model, key)(IDS)
    np.testing.assert_array_equal(model(IDS), first)  # the same key, the same masks
    assert not np.allclose(first, plain)
    other = set_dropout_key(model, jax.random.fold_in(key, 1))(IDS)
    assert not np.allclose(other, first)
    np.testing.assert_array_equal(set_dropout_key(model, None)(IDS), plain)
    # a rate of 0: no key is kept and nothing changes
    still = add_lora(_model(scan), 4, rngs=nnx.Rngs(1))
    assert not uses_dropout(still)
    before = still(IDS)
    np.testing.assert_array_equal(set_dropout_key(still, key)(IDS), before)


def test_dropout_is_inverted_dropout_on_the_adapter_input():
    """``_dropout``: kept elements scaled by 1 / (1 - rate), the rest 0, mean preserved."""
    from hacbo_jax.models.lora import _dropout

    x = jnp.ones((200, 100))
    y = np.asarray(_dropout(x, 0.25, jax.random.key_data(jax.random.key(0))))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.01


def test_every_layer_and_projection_gets_its_own_key_and_both_layouts_the_same():
    unrolled, scanned = _with_dropout(False), _with_dropout(True)
    key = jax.random.key(5)
    set_dropout_key(unrolled, key), set_dropout_key(scanned, key)
    keys = {}
    for layer, name, module in lora_modules(unrolled):
        keys[layer, name] = np.asarray(module.dropout_key[...])
    assert len({k.tobytes() for k in keys.values()}) == len(keys)  # all distinct
    for layer, name, module in lora_modules(scanned):
        stacked = np.asarray(module.dropout_key[...])  # [L, 2], sliced by lax.scan
        assert stacked.shape == (CONFIG.num_hidden_layers, 2)
        for i in range(CONFIG.num_hidden_layers):
            np.testing.assert_array_equal(stacked[i], keys[i, name])


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_scanned_and_unrolled_dropout_give_the_same_forward_and_gradient(tmp_path, remat):
    """The same adapter and key: the scanned model draws the unrolled model's masks (layer i
    its own), also when remat recomputes the layer in the backward pass."""
    base = _model()
    base.save_pretrained(tmp_path / "base")
    unrolled = add_lora(base, 4, alpha=16, dropout=0.3)
    _randomise_b(unrolled)
    save_adapter(unrolled, tmp_path / "adapter")
    scanned = Qwen3ForCausalLM.from_pretrained(tmp_path / "base", scan_layers=True, remat=remat)
    load_adapter(add_lora(scanned, 4, alpha=16, dropout=0.3), tmp_path / "adapter")
    key = jax.random.key_data(jax.random.key(11))

    def loss_and_grad(model):
        graphdef, params, rest = split_lora(model)

        def loss(p):
            m = set_dropout_key(nnx.merge(graphdef, nnx.State(p), rest), key)
            return jnp.mean(m(IDS) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        a = grads["model"]["layers"]
        return value, a

    v_unrolled, g_unrolled = loss_and_grad(unrolled)
    v_scanned, g_scanned = loss_and_grad(scanned)
    np.testing.assert_allclose(v_scanned, v_unrolled, rtol=1e-5)
    for i in range(CONFIG.num_hidden_layers):
        want = g_unrolled[i]["mlp"]["down_proj"]["lora"]["lora_b"]
        got = g_scanned["mlp"]["down_proj"]["lora"]["lora_b"][i]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    no_key = jnp.mean(unrolled(IDS) ** 2)
    assert not np.isclose(float(no_key), float(v_unrolled))  # the masks did act


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=4, targets="q_proj,qkv"), "unknown LoRA target module(s) ['qkv']"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-2), "rank must be a positive integer"),
        (dict(rank=33, targets="q_proj"), "larger than the smaller dimension of q_proj"),
        (dict(rank=4, alpha=0.0), "alpha must be"),
        (dict(rank=4, dropout=1.0), "dropout must be in [0, 1)"),
    ],
)
def test_bad_settings_are_refused_and_the_model_is_unchanged(kwargs, message):
    model = _model()
    with pytest.raises(ValueError) as err:
        add_lora(model, **kwargs)
    assert message in str(err.value)
    assert not has_lora(model)


def test_rank_above_several_projections_names_each_of_them():
    with pytest.raises(ValueError) as err:
        add_lora(_model(), 40)  # > D = 32 and > N*H = 32, < F = 48
    text = str(err.value)
    for name in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"):
        assert name in text


def test_a_missing_or_already_adapted_module_is_refused_with_every_problem():
    model = add_lora(_model(), 2, targets="q_proj")
    model.model.layers[1].mlp.up_proj = None  # a model without that projection
    with pytest.raises(ValueError) as err:
        add_lora(model, 2, targets="q_proj,up_proj")
    text = str(err.value)
    assert "layers.0.self_attn.q_proj already has a LoRA adapter" in text
    assert "layers.1.self_attn.q_proj already has a LoRA adapter" in text
    assert "layers.1.mlp.up_proj: the model has no such projection" in text
    assert not isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)


def test_targets_resolve_groups_and_names_in_layer_order():
    assert resolve_targets("mlp,q_proj") == ("q_proj", "gate_proj", "up_proj", "down_proj")
    assert resolve_targets(["all"]) == resolve_targets("attn,mlp")


def _saved_adapter(tmp_path, **kwargs):
    model = add_lora(_model(), 4, **kwargs)
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_a_mismatching_adapter_lists_every_problem_before_changing_the_model(tmp_path):
    directory = _saved_adapter(tmp_path)
    config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
    config["target_modules"] = ["q_proj", "qkv_proj"]
    config["use_dora"] = True
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    model = _model()
    with pytest.raises(ValueError) as err:
        load_adapter(model, directory)
    text = str(err.value)
    assert "target_modules ['qkv_proj']: unknown" in text and "use_dora = True" in text
    assert not has_lora(model)


def test_an_adapter_of_another_rank_or_depth_is_refused(tmp_path):
    directory = _saved_adapter(tmp_path)
    with pytest.raises(ValueError, match="LoRA rank = 4, but the model's adapters have 2"):
        load_adapter(add_lora(_model(), 2), directory)
    deeper = Qwen3ForCausalLM(
        Qwen3Config(**{**CONFIG.__dict__, "num_hidden_layers": 3}), rngs=nnx.Rngs(0)
    )
    other = tmp_path / "deeper"
    save_adapter(add_lora(deeper, 4), other)
    model = _model()
    with pytest.raises(ValueError) as err:
        load_adapter(model, other)
    assert "layer(s) [2], but the model has 2 layers" in str(err.value)
    assert not has_lora(model)


def test_an_adapter_of_other_shapes_or_missing_files_is_refused(tmp_path):
    directory = _saved_adapter(tmp_path)
    wider = Qwen3ForCausalLM(
        Qwen3Config(**{**CONFIG.__dict__, "intermediate_size": 40}), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="shape mismatches"):
        load_adapter(wider, directory)
    (directory / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_adapter(_model(), directory)
    with pytest.raises(ValueError, match="is not a directory"):
        load_adapter(_model(), tmp_path / "nowhere")


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(_model(), tmp_path)


# ---- PEFT parity --------------------------------------------------------------------------


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory, tiny_model_dir):
    """Checkpoints of the three families: the tiny Qwen3, a Qwen2 (q/k/v biases) and a Llama
    (untied), the last two written by transformers."""
    dirs = {"qwen3": tiny_model_dir}
    common = dict(
        vocab_size=83,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    for name, cls, cfg_cls, extra in (
        ("qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
        (
            "llama",
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig,
            dict(tie_word_embeddings=False),
        ),
    ):
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(name)
        cls(cfg_cls(**common, **extra)).save_pretrained(directory)
        dirs[name] = directory
    return dirs


def _ids(vocab: int) -> jnp.ndarray:
    return jnp.asarray(np.random.RandomState(1).randint(0, vocab, (2, 9)))


@pytest.mark.parametrize(
    "scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scan"]
)
@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_our_adapter_gives_peft_the_same_logits(variant_dirs, tmp_path, family, scan):
    model = Qwen3ForCausalLM.from_pretrained(variant_dirs[family], scan_layers=scan)
    add_lora(model, 4, alpha=8, rngs=nnx.Rngs(1))
    _randomise_b(model)
    ids = _ids(model.config.vocab_size)
    ours = np.asarray(model(ids))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(variant_dirs[family]))
    base = transformers.AutoModelForCausalLM.from_pretrained(variant_dirs[family])
    theirs = _torch_logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter"), ids)
    diff = float(np.abs(ours - theirs).max())
    print(
        f"\nours -> peft ({family}, {'scan' if scan else 'unrolled'}): max |logit diff| {diff:.2e}"
    )
    assert diff < PARITY_ATOL
    assert np.abs(ours - np.asarray(merge_lora(model)(ids))).max() < PARITY_ATOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_a_peft_made_adapter_loads_with_the_same_logits(tiny_model_dir, tmp_path, scan):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
    )
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    ids = _ids(peft_model.config.vocab_size)
    theirs = _torch_logits(peft_model, ids)
    model = load_adapter(
        Qwen3ForCausalLM.from_pretrained(tiny_model_dir, scan_layers=scan), tmp_path / "peft"
    )
    model.eval()
    settings = lora_settings(model)
    assert (settings.rank, settings.alpha) == (4, 12.0)
    assert settings.targets == ("q_proj", "v_proj", "o_proj", "down_proj")
    diff = float(np.abs(np.asarray(model(ids)) - theirs).max())
    print(f"\npeft -> ours ({'scan' if scan else 'unrolled'}): max |logit diff| {diff:.2e}")
    assert diff < PARITY_ATOL


def test_merged_export_loads_in_plain_transformers(tiny_model_dir, tmp_path):
    model = add_lora(Qwen3ForCausalLM.from_pretrained(tiny_model_dir, scan_layers=True), 4)
    _randomise_b(model)
    ids = _ids(model.config.vocab_size)
    adapted = np.asarray(model(ids))
    merge_lora(model).save_pretrained(tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    diff = float(np.abs(_torch_logits(plain, ids) - adapted).max())
    print(f"\nmerged export -> transformers: max |logit diff| {diff:.2e}")
    assert diff < PARITY_ATOL
