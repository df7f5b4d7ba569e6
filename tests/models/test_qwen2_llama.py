"""Qwen2 / Qwen2.5 and Llama 3 as options of the Qwen3 port, checked against transformers.

The same checks as tests/test_qwen3.py on tiny random checkpoints written by transformers'
``Qwen2ForCausalLM`` and ``LlamaForCausalLM``: logits (1e-4), loss gradients (relative 1e-4),
greedy generation (token-identical), save -> transformers load, and HACBO labels.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test extras: the reference must never skip silently
import transformers
from flax import nnx

from hacbo_jax.models.generation import generate
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, rope_inv_freq
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.models.qwen3_hf import hf_name, param_to_hf

VOCAB = 83
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the 16-dim heads have high-, medium- and low-frequency bands (wavelengths
    # 6.3, 32 and >= 167 against 64 / 4 = 16 and 64 / 1 = 64).
    "original_max_position_embeddings": 64,
}
COMMON = dict(vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=2, initializer_range=0.3)
# name -> (transformers class, config class, kwargs)
CONFIGS = {
    "qwen2_tied": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config,
        dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             rope_theta=1e6, tie_word_embeddings=True),
    ),
    "qwen2_untied": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config,
        dict(COMMON, hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
             rope_theta=321.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
    "llama3_untied": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        dict(COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    ),
    "llama_tied_bias": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        dict(COMMON, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
             attention_bias=True, tie_word_embeddings=True),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model)."""
    out = {}
    for i, (name, (model_cls, config_cls, kwargs)) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        cfg = config_cls(**kwargs, eos_token_id=3, pad_token_id=0, bos_token_id=1)
        hf = model_cls(cfg).eval()
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # norms start at 1 and biases at 0: perturb so misplacing shows
            for pname, p in hf.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                elif pname.endswith(".bias"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
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
    for row, n in enumerate([0, 3, 7][:batch]):
        if n and padding == "left":
            mask[row, :n] = 0
        elif n and padding == "right":
            mask[row, length - n :] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
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
def test_configs_read_as_options_of_the_port(models):
    q2, llama = models["qwen2_untied"].config, models["llama3_untied"].config
    assert (q2.model_type, q2.qk_norm, q2.attention_bias, q2.attention_out_bias) == (
        "qwen2", False, True, False
    )  # fmt: skip
    assert q2.head_dim == 12 and q2.rope_scaling is None
    assert (llama.model_type, llama.qk_norm, llama.attention_bias) == ("llama", False, False)
    assert dict(llama.rope_scaling) == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert llama.rope_theta == 5e5
    biased = models["llama_tied_bias"].config
    assert biased.attention_bias and biased.attention_out_bias and biased.head_dim == 10
    attn = models["qwen2_tied"].model.layers[0].self_attn
    assert attn.q_norm is None and attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=LLAMA3_ROPE
    )
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(16, 5e5, LLAMA3_ROPE)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert scale == 1.0
    plain = rope_inv_freq(16, 5e5)
    # Bands: the fastest frequency kept, the slowest divided by the factor, one interpolated.
    assert ours[0] == plain[0] and np.isclose(ours[-1], plain[-1] / 8)
    assert plain[1] / 8 < ours[1] < plain[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_transformers(checkpoints, models, name, padding):
    ids, mask = _batch(0, padding=padding)
    ref = _hf_logits(checkpoints[name][1], ids, mask)
    ours = np.asarray(models[name](jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e} on non-pad positions"
    assert np.abs(ref[real]).max() > 0.5


@pytest.mark.slow  # ~40 s on the shared machine (builds and runs a second model eagerly)
def test_llama3_scaling_changes_the_logits(models):
    """The parity above would not notice a missing scaling if it changed nothing."""
    model = models["llama3_untied"]
    unscaled = Qwen3ForCausalLM(dataclasses.replace(model.config, rope_scaling=None))
    nnx.update(unscaled, nnx.state(model, nnx.Param))
    ids, _ = _batch(1)
    diff = np.abs(np.asarray(unscaled(jnp.asarray(ids))) - np.asarray(model(jnp.asarray(ids))))
    assert diff.max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_untied", "llama3_untied", "llama_tied_bias"])
def test_loss_gradient_matches_transformers(checkpoints, models, name):
    _, hf = checkpoints[name]
    ids, mask = _batch(2, padding="right")
    hf.zero_grad()
    logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    weights = torch.tensor(mask[:, 1:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), torch.tensor(ids[:, 1:]).reshape(-1), reduction="none"
    )
    (nll * weights.reshape(-1)).sum().div(weights.sum()).backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}
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
@pytest.mark.parametrize("name", ["qwen2_tied", "llama3_untied"])
def test_greedy_generation_matches_hf_generate(checkpoints, models, name):
    _, hf = checkpoints[name]
    ids, mask = _batch(3, length=9, padding="left")
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=3,
            pad_token_id=0,
        ).numpy()[:, 9:]
    ref = np.pad(ref, ((0, 0), (0, 24 - ref.shape[1])), constant_values=0)
    ours = np.asarray(generate(models[name], ids, mask, max_new_tokens=24))  # eos/pad: config
    np.testing.assert_array_equal(ours, ref)
    assert max(len(set(row.tolist())) for row in ours) >= 5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_then_transformers_load_gives_identical_model(checkpoints, models, tmp_path, name):
    model = models[name]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf) is CONFIGS[name][0]
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    if model.config.tie_word_embeddings:
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
    assert Qwen3ForCausalLM.from_pretrained(tmp_path).config == model.config
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (generation.eos_token_id, generation.pad_token_id) == (3, 0)


@pytest.mark.parametrize("name", ["qwen2_untied", "llama_tied_bias"])
def test_labels_group_biases_with_their_projections(models, name):
    _, params, _ = nnx.split(models[name], nnx.Param, ...)
    labels = qwen3_labels(params)
    by_name = {
        hf_name(tuple(str(getattr(k, "key", k)) for k in path if getattr(k, "name", None) != "value")): label
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
    }  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert by_name[p + f"self_attn.{proj}.weight"] == f"{i}/attn_qkv"
            assert by_name[p + f"self_attn.{proj}.bias"] == f"{i}/attn_qkv"
        assert by_name[p + "self_attn.o_proj.weight"] == f"{i}/attn_out"
        assert (p + "self_attn.o_proj.bias" in by_name) == (name == "llama_tied_bias")
        if name == "llama_tied_bias":
            assert by_name[p + "self_attn.o_proj.bias"] == f"{i}/attn_out"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert by_name[p + f"mlp.{proj}.weight"] == f"{i}/mlp"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert by_name[p + norm + ".weight"] == f"{i}/ln"
        assert p + "self_attn.q_norm.weight" not in by_name
    assert by_name["model.embed_tokens.weight"] == "other"
    assert sorted(set(by_name.values())) == sorted(
        {"other"} | {f"{i}/{m}" for i in range(2) for m in ("attn_qkv", "attn_out", "mlp", "ln")}
    )


BASE = dict(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2
)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(model_type="mistral"), "model_type='mistral'"),
        (dict(model_type="qwen3_moe", num_experts=8), "model_type='qwen3_moe'"),
        (dict(model_type="llama", num_local_experts=4), "num_local_experts=4 .mixture-of-experts"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
        (dict(model_type="qwen2", layer_types=["sliding_attention"]), "sliding_attention"),
        (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
        (dict(model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
        (dict(model_type="qwen3", rope_parameters=LLAMA3_ROPE), "'llama3'"),
        (dict(model_type="llama", mlp_bias=True), "mlp_bias"),
    ],
)
def test_unsupported_models_and_features_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        Qwen3Config.from_hf({**BASE, **config})


def test_config_round_trips_and_direct_construction_is_checked():
    for model_type in ("qwen2", "llama"):
        extra = {"rope_parameters": LLAMA3_ROPE} if model_type == "llama" else {}
        cfg = Qwen3Config.from_hf({**BASE, "model_type": model_type, **extra})
        assert Qwen3Config.from_hf(cfg.to_hf_dict()) == cfg
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        Qwen3Config(**BASE, num_key_value_heads=2, model_type="gpt2")
    with pytest.raises(ValueError, match="'yarn'"):
        Qwen3Config(**BASE, num_key_value_heads=2, rope_scaling={"rope_type": "yarn"})
    with pytest.raises(ValueError, match="missing"):
        Qwen3Config(**BASE, num_key_value_heads=2, rope_scaling={"rope_type": "llama3"})
    # A qwen2 model type with Qwen3's q/k norm cannot be written as a Qwen2 checkpoint.
    bad = Qwen3Config(**BASE, num_key_value_heads=2, model_type="qwen2", attention_bias=True)
    with pytest.raises(ValueError, match="qk_norm"):
        bad.to_hf_dict()


@pytest.mark.parametrize("name", ["qwen2_untied", "llama3_untied"])
def test_scanned_layers_match_the_unrolled_model(checkpoints, models, tmp_path, name):
    scanned = Qwen3ForCausalLM.from_pretrained(checkpoints[name][0], scan_layers=True)
    ids, mask = _batch(4, padding="left")
    np.testing.assert_allclose(
        np.asarray(scanned(jnp.asarray(ids), jnp.asarray(mask)))[mask.astype(bool)],
        np.asarray(models[name](jnp.asarray(ids), jnp.asarray(mask)))[mask.astype(bool)],
        atol=1e-4,  # the parity bound; scan reorders float32 sums (seen: 1.1e-5 on |logit| 0.9)
    )
    scanned.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref = _flat_params(models[name])
    for key, value in hf.state_dict().items():
        if key in ref:
            np.testing.assert_array_equal(value.numpy(), ref[key], err_msg=key)
