"""Scanned layers, remat policies and attention implementations of the Qwen3 port.

Every variant is checked against the plain model (unrolled layers, no remat, einsum attention)
in float32 at the highest matmul precision; the scanned model is also checked against
transformers through a Hugging Face save.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hacbo_jax.models.generation import generate
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.models.qwen3_hf import state_to_hf

HF_CONFIG = dict(
    vocab_size=71,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=1e4,
    tie_word_embeddings=False,
    attention_bias=True,
    initializer_range=0.3,
    eos_token_id=3,
    pad_token_id=0,
    bos_token_id=1,
)


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    directory = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(directory)
    return str(directory), hf


def _batch(seed=0, padding="right"):
    rs = np.random.RandomState(seed)
    ids = rs.randint(4, HF_CONFIG["vocab_size"], (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n in enumerate([0, 3, 6]):
        if n:
            if padding == "right":
                mask[row, -n:] = 0
            else:
                mask[row, :n] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss_and_grads(model, ids, mask):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        w = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return loss, {name: np.asarray(t) for name, t in state_to_hf(grads)}


def test_scanned_params_are_stacked(checkpoint):
    model = Qwen3ForCausalLM.from_pretrained(checkpoint[0], scan_layers=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = params["model"]["layers"]
    assert layers["mlp"]["up_proj"]["kernel"].shape == (3, 32, 48)  # [L, D, F]
    assert layers["self_attn"]["q_proj"]["kernel"].shape == (3, 32, 4, 8)  # [L, D, N, H]
    assert layers["input_layernorm"]["weight"].shape == (3, 32)
    hf = dict(checkpoint[1].named_parameters())
    np.testing.assert_array_equal(
        layers["mlp"]["up_proj"]["kernel"][2], hf["model.layers.2.mlp.up_proj.weight"].detach().T
    )


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_logits_and_grads_equal_unrolled(checkpoint, remat):
    ids, mask = _batch(1)
    plain = Qwen3ForCausalLM.from_pretrained(checkpoint[0])
    scanned = Qwen3ForCausalLM.from_pretrained(checkpoint[0], scan_layers=True, remat=remat)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(scanned(ids, mask))[real], np.asarray(plain(ids, mask))[real], atol=1e-5
    )
    ref_loss, ref = _loss_and_grads(plain, ids, mask)
    loss, ours = _loss_and_grads(scanned, ids, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [True, "dots"])
def test_remat_policies_keep_grads(checkpoint, remat):
    ids, mask = _batch(2)
    _, ref = _loss_and_grads(Qwen3ForCausalLM.from_pretrained(checkpoint[0]), ids, mask)
    _, ours = _loss_and_grads(
        Qwen3ForCausalLM.from_pretrained(checkpoint[0], remat=remat), ids, mask
    )
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-5, err_msg=name)


def test_scanned_save_loads_in_transformers(checkpoint, tmp_path):
    scanned = Qwen3ForCausalLM.from_pretrained(checkpoint[0], scan_layers=True)
    scanned.save_pretrained(tmp_path)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _batch(3)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(scanned(ids, mask))[real], ref.logits.numpy()[real], atol=1e-4
    )


@pytest.mark.slow
def test_generation_with_scanned_layers(checkpoint):
    ids, mask = _batch(4, padding="left")
    kwargs = dict(max_new_tokens=6, eos_token_id=3, pad_token_id=0)
    plain = Qwen3ForCausalLM.from_pretrained(checkpoint[0])
    scanned = Qwen3ForCausalLM.from_pretrained(checkpoint[0], scan_layers=True)
    cache = scanned.init_cache(3, 17)
    assert cache[0].shape == (3, 3, 17, 2, 8)  # stacked [L, B, S, K, H]
    np.testing.assert_array_equal(
        generate(scanned, ids, mask, **kwargs), generate(plain, ids, mask, **kwargs)
    )


@pytest.mark.parametrize("padding", ["right", None])
def test_xla_attention_arguments_match_explicit_mask(checkpoint, padding):
    """attention_impl="xla" passes is_causal + sequence lengths to jax.nn.dot_product_attention
    (the arguments the cudnn path uses); it must give the einsum path's logits."""
    ids, mask = _batch(5, padding=padding or "right")
    if padding is None:
        mask = jnp.ones_like(mask)
    plain = Qwen3ForCausalLM.from_pretrained(checkpoint[0])
    xla = Qwen3ForCausalLM.from_pretrained(checkpoint[0], attention_impl="xla")
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(xla(ids, mask))[real], np.asarray(plain(ids, mask))[real], atol=1e-5
    )


def test_invalid_options_are_rejected():
    c = Qwen3Config(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
    )
    with pytest.raises(ValueError, match="remat must be True, False or one of"):
        Qwen3ForCausalLM(c, remat="some")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        Qwen3ForCausalLM(c, attention_impl="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU"):
            Qwen3ForCausalLM(c, attention_impl="cudnn")
    model = Qwen3ForCausalLM(c)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="either attention_mask"):
        model(ids, jnp.ones((1, 4)), segment_ids=jnp.ones((1, 4)))
