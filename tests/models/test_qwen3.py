"""Parity of the Flax NNX Qwen3 port with transformers' PyTorch Qwen3 (the reference).

Tiny random checkpoints are written by transformers itself, then loaded by our loader; all
comparisons run in float32 with the highest matmul precision.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import torch  # the test extras pin torch==2.13.0 (CPU): parity must never skip silently
import transformers

from hacbo_jax.models.generation import generate  # noqa: E402
from hacbo_jax.models.qwen3 import (  # noqa: E402
    Qwen3Config,
    Qwen3ForCausalLM,
)
from hacbo_jax.models.qwen3_hf import hf_name, param_to_hf  # noqa: E402
from hacbo_jax.trainer.recipes import qwen3_labels  # noqa: E402

VOCAB = 89

# name -> transformers.Qwen3Config kwargs. initializer_range is raised so random weights give
# peaked, non-degenerate next-token distributions (greedy decoding then does not loop on one id).
CONFIGS = {
    "tied": dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        tie_word_embeddings=True,
        initializer_range=0.3,
    ),
    "untied_theta": dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=12,
        rope_theta=321.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.1,
    ),
    "odd_gqa_bias": dict(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=10,
        rope_theta=5e4,
        tie_word_embeddings=False,
        attention_bias=True,
        initializer_range=0.1,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _randomise_norms(hf_model, seed):
    """Norm weights start at 1; perturb them so a transposed/misplaced norm would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(
                    1.0 + 0.3 * torch.randn(p.shape, generator=g)
                    if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g)
                )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model) for every config in CONFIGS."""
    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        cfg = transformers.Qwen3Config(**kwargs, eos_token_id=3, pad_token_id=0, bos_token_id=1)
        hf = transformers.Qwen3ForCausalLM(cfg).eval()
        _randomise_norms(hf, i)
        directory = tmp_path_factory.mktemp(name)
        hf.save_pretrained(directory)
        out[name] = (str(directory), hf)
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: Qwen3ForCausalLM.from_pretrained(d) for name, (d, _) in checkpoints.items()}


def _batch(seed, batch=3, length=13, padding=None):
    rs = np.random.RandomState(seed)
    ids = rs.randint(4, VOCAB, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    n_pad = [0, 3, 7][:batch]
    for row, n in enumerate(n_pad):
        if n and padding == "left":
            mask[row, :n] = 0
        elif n and padding == "right":
            mask[row, length - n :] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what transformers' generate passes
    with torch.no_grad():
        return hf(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()


def _flat_params(model):
    return {
        hf_name(p): np.asarray(param_to_hf(p, v[...]))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_logits_match_transformers(checkpoints, models, name, padding):
    ids, mask = _batch(0, padding=padding)
    ref = _hf_logits(checkpoints[name][1], ids, mask)
    ours = np.asarray(models[name](jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    assert ours.shape == (3, 13, VOCAB) and ours.dtype == np.float32
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e} on non-pad positions"
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between near-zero logits


def test_mask_none_equals_all_ones(models):
    ids, _ = _batch(1, padding=None)
    model = models["tied"]
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray(ids))),
        np.asarray(model(jnp.asarray(ids), jnp.ones(ids.shape))),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tied", "odd_gqa_bias"])
def test_loss_gradient_matches_transformers(checkpoints, models, name):
    _, hf = checkpoints[name]
    ids, mask = _batch(2, padding="right")
    hf.zero_grad()
    logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    targets = torch.tensor(ids[:, 1:])
    weights = torch.tensor(mask[:, 1:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), reduction="none"
    )
    (nll * weights.reshape(-1)).sum().div(weights.sum()).backward()
    # named_parameters() lists a tied lm_head once, as the embedding (which holds both grads).
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    assert ("lm_head.weight" in ref) != hf.config.tie_word_embeddings

    graphdef, params, rest = nnx.split(models[name], nnx.Param, ...)

    def loss_fn(params):
        out = nnx.merge(graphdef, params, rest)(jnp.asarray(ids), jnp.asarray(mask))
        logp = jax.nn.log_softmax(out[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], -1)[..., 0]
        w = jnp.asarray(mask[:, 1:], jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w)

    grads = jax.jit(jax.grad(loss_fn))(params)
    ours = {hf_name(p): np.asarray(param_to_hf(p, v[...])) for p, v in nnx.to_flat_state(grads)}
    assert sorted(ours) == sorted(ref)
    for key, g in ref.items():
        rel = np.abs(ours[key] - g).max() / np.abs(g).max()
        assert rel <= 1e-4, f"{key}: relative gradient error {rel:.2e}"


@pytest.mark.slow
def test_greedy_generation_matches_hf_generate(checkpoints, models):
    _, hf = checkpoints["tied"]
    ids, mask = _batch(3, length=9, padding="left")
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=3,
            pad_token_id=0,
        ).numpy()[:, 9:]
    ref = np.pad(ref, ((0, 0), (0, 32 - ref.shape[1])), constant_values=0)
    ours = np.asarray(
        generate(models["tied"], ids, mask, max_new_tokens=32, eos_token_id=3, pad_token_id=0)
    )
    np.testing.assert_array_equal(ours, ref)
    for row in ours:  # random weights still give varied continuations
        assert len(set(row.tolist())) >= 6, row


@pytest.mark.slow
def test_generation_stops_at_eos_and_pads(models):
    model = models["untied_theta"]
    ids, mask = _batch(4, length=9, padding="left")
    free = np.asarray(
        generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    )
    eos = int(free[0, 4])  # make row 0's 5th token an EOS
    out = np.asarray(
        generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    )
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free == eos)
        stop = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == 0).all()
    first = np.flatnonzero(free[0] == eos)[0]  # <= 4: eos may also occur earlier in row 0
    assert out[0, first] == eos and (out[0, first + 1 :] == 0).all() and first < 11


@pytest.mark.slow
def test_temperature_sampling_is_seeded_and_valid(models):
    model = models["tied"]
    ids, mask = _batch(5, length=9, padding="left")
    kwargs = dict(max_new_tokens=10, eos_token_id=3, pad_token_id=0, temperature=1.5)
    a = np.asarray(generate(model, ids, mask, rng=jax.random.key(0), **kwargs))
    b = np.asarray(generate(model, ids, mask, rng=jax.random.key(0), **kwargs))
    c = np.asarray(generate(model, ids, mask, rng=jax.random.key(1), **kwargs))
    greedy = np.asarray(
        generate(model, ids, mask, max_new_tokens=10, eos_token_id=3, pad_token_id=0)
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    assert ((a >= 0) & (a < VOCAB)).all()
    with pytest.raises(ValueError, match="rng"):
        generate(
            model, ids, mask, max_new_tokens=4, eos_token_id=3, pad_token_id=0, temperature=1.0
        )


@pytest.mark.parametrize("name", ["tied", "untied_theta"])
def test_save_then_transformers_load_gives_identical_model(models, tmp_path, name):
    model = models[name]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.rope_parameters["rope_theta"] == model.config.rope_theta
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    if model.config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        hf_state.pop("lm_head.weight")
    ours = _flat_params(model)
    assert sorted(hf_state) == sorted(ours)
    for key, value in ours.items():
        np.testing.assert_array_equal(hf_state[key], value, err_msg=key)
    ids, mask = _batch(6, padding="left")
    diff = np.abs(
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))) - _hf_logits(hf, ids, mask)
    )[mask.astype(bool)].max()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["tied", "odd_gqa_bias"])
def test_load_save_load_round_trip_is_bitwise(checkpoints, models, tmp_path, name):
    directory, _ = checkpoints[name]
    models[name].save_pretrained(tmp_path)
    original = load_file(os.path.join(directory, "model.safetensors"))
    saved = load_file(tmp_path / "model.safetensors")
    original.pop("lm_head.weight", None) if CONFIGS[name]["tie_word_embeddings"] else None
    assert sorted(original) == sorted(saved)
    for key in original:
        assert original[key].dtype == saved[key].dtype
        np.testing.assert_array_equal(original[key], saved[key], err_msg=key)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config == models[name].config
    a, b = _flat_params(models[name]), _flat_params(reloaded)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_sharded_checkpoint_and_bf16_storage(checkpoints, models, tmp_path):
    _, hf = checkpoints["odd_gqa_bias"]
    hf.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    hf.to(torch.float32)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = Qwen3ForCausalLM.from_pretrained(tmp_path)
    ref = _flat_params(models["odd_gqa_bias"])
    for key, value in _flat_params(model).items():
        assert value.dtype == np.float32
        expected = jnp.asarray(ref[key]).astype(jnp.bfloat16).astype(jnp.float32)
        np.testing.assert_array_equal(value, np.asarray(expected), err_msg=key)


def test_tied_checkpoint_with_lm_head_tensor_loads(checkpoints, models, tmp_path):
    directory, _ = checkpoints["tied"]
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    model = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head is None
    ids, _ = _batch(7)
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray(ids))), np.asarray(models["tied"](jnp.asarray(ids)))
    )


def test_bad_checkpoint_reports_every_problem_by_name(checkpoints, tmp_path):
    directory, _ = checkpoints["untied_theta"]
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 48), np.float32)
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    with pytest.raises(ValueError) as err:
        Qwen3ForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    for expected in (
        "missing tensors (2)",
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
        "unexpected tensors (1)",
        "model.layers.0.self_attn.extra.weight",
        "shape mismatches (1)",
        "model.layers.0.self_attn.k_proj.weight: checkpoint (5, 48), model expects (48, 48)",
    ):
        assert expected in msg, msg


def test_missing_weights_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            Qwen3Config(
                vocab_size=8,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=4,
            ).to_hf_dict()
        )
    )
    with pytest.raises(ValueError, match="no model.safetensors"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


BASE = dict(
    model_type="qwen3",
    vocab_size=8,
    hidden_size=8,
    intermediate_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="mistral"), "model_type='mistral'"),  # qwen2 / llama are options now
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "'yarn'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_key_value_heads"),
    ],
)
def test_config_rejects_unsupported(change, message):
    with pytest.raises(ValueError, match=message):
        Qwen3Config.from_hf({**BASE, **change})


def test_config_reports_several_problems_at_once():
    with pytest.raises(ValueError) as err:
        Qwen3Config.from_hf({**BASE, "use_sliding_window": True, "hidden_act": "relu"})
    assert "use_sliding_window" in str(err.value) and "relu" in str(err.value)


def test_non_qwen3_checkpoint_directory_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="unsupported model_type='qwen3_moe'"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


def test_config_reads_rope_theta_from_both_layouts_and_round_trips():
    new = Qwen3Config.from_hf(
        {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    )
    old = Qwen3Config.from_hf({**BASE, "rope_theta": 1234.0, "rope_scaling": None})
    assert new.rope_theta == old.rope_theta == 1234.0
    cfg = Qwen3Config.from_hf(
        {
            **BASE,
            "head_dim": 6,
            "rms_norm_eps": 3e-5,
            "tie_word_embeddings": True,
            "rope_theta": 77.0,
            "eos_token_id": [5, 6],
        }
    )
    assert (cfg.head_dim, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (6, 3e-5, True)
    assert Qwen3Config.from_hf(cfg.to_hf_dict()) == cfg
    hf = transformers.Qwen3Config(**cfg.to_hf_dict())
    assert hf.rope_parameters["rope_theta"] == 77.0 and hf.head_dim == 6


def test_qwen3_0_6b_preset_shapes():
    cfg = Qwen3Config.qwen3_0_6b()
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.rms_norm_eps,
        cfg.rope_theta,
        cfg.tie_word_embeddings,
    ) == (28, 1024, 16, 8, 128, 3072, 151936, 1e-6, 1e6, True)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg))
    n_params = sum(
        int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    )
    assert n_params == 596_049_920  # 0.44B non-embedding + 151936 x 1024 embedding, as published


@pytest.mark.parametrize("name", ["tied", "untied_theta"])
def test_labels_on_model_tree(models, name):
    model = models[name]
    _, params, _ = nnx.split(model, nnx.Param, ...)
    n_layers = model.config.num_hidden_layers
    for tree in (params, nnx.to_pure_dict(params)):
        labels = qwen3_labels(tree)
        assert jax.tree.structure(labels) == jax.tree.structure(tree)
        by_name = {
            hf_name(
                tuple(
                    str(getattr(k, "key", k)) for k in path if getattr(k, "name", None) != "value"
                )
            ): label
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
        }
        assert by_name["model.embed_tokens.weight"] == "other"
        assert by_name["model.norm.weight"] == "other"
        if not model.config.tie_word_embeddings:
            assert by_name["lm_head.weight"] == "other"
        for i in range(n_layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert by_name[p + f"self_attn.{proj}.weight"] == f"{i}/attn_qkv"
            assert by_name[p + "self_attn.o_proj.weight"] == f"{i}/attn_out"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert by_name[p + f"mlp.{proj}.weight"] == f"{i}/mlp"
            for norm in (
                "input_layernorm",
                "post_attention_layernorm",
                "self_attn.q_norm",
                "self_attn.k_norm",
            ):
                assert by_name[p + norm + ".weight"] == f"{i}/ln"
        assert sorted(set(by_name.values())) == sorted(
            {"other"}
            | {f"{i}/{m}" for i in range(n_layers) for m in ("attn_qkv", "attn_out", "mlp", "ln")}
        )


@pytest.mark.slow
def test_mixed_precision_and_remat(checkpoints, models):
    directory, _ = checkpoints["tied"]
    ids, mask = _batch(8, padding="left")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    real = np.asarray(mask).astype(bool)
    ref = np.asarray(models["tied"](ids, mask))
    mixed = Qwen3ForCausalLM.from_pretrained(
        directory, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True
    )
    half = Qwen3ForCausalLM.from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for model, param_dtype in ((mixed, jnp.float32), (half, jnp.bfloat16)):
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(leaf.dtype == param_dtype for leaf in leaves)
        out = np.asarray(model(ids, mask))
        assert out.dtype == np.float32
        scale = np.abs(ref[real]).max()
        assert np.abs(out - ref)[real].max() <= 0.05 * scale
        # bf16 compute really happened: not bit-identical to fp32.
        assert np.abs(out - ref)[real].max() > 0

    # Remat changes memory, not maths: fp32 gradients with and without remat agree.
    remat = Qwen3ForCausalLM.from_pretrained(directory, remat=True)

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids, mask) ** 2))(params)

    for a, b in zip(jax.tree.leaves(grads(models["tied"])), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_parameters_save_and_reload_exactly(checkpoints, tmp_path):
    directory, _ = checkpoints["untied_theta"]
    half = Qwen3ForCausalLM.from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    again = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for a, b in zip(
        jax.tree.leaves(nnx.state(half, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))
    ):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
