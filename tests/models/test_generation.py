"""Generation: transformers' logits processors, end tokens, prompt checks, program reuse.

References are transformers' own logits processors and ``generate`` (PyTorch, CPU) on a tiny
random Qwen3 written by transformers and loaded by our loader.
"""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch  # test extras: the reference must never skip silently
import transformers
from transformers.generation import logits_process as lp

from hacbo_jax.models import generation
from hacbo_jax.models.generation import (
    GenerationConfig,
    bucket_length,
    chat_prompt,
    compiled_program_count,
    generate,
    process_logits,
)
from hacbo_jax.models.qwen3 import Qwen3ForCausalLM

VOCAB = 97
TOKENIZER_DIR = ASSETS_DIR / "qwen3-tokenizer"


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our model, transformers model) of one tiny random Qwen3."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.3,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=1,
    )
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    directory = tmp_path_factory.mktemp("tiny_qwen3")
    hf.save_pretrained(directory)
    return Qwen3ForCausalLM.from_pretrained(directory), hf


def _prompts(seed, batch=3, length=9, n_pad=(0, 2, 5)):
    rs = np.random.RandomState(seed)
    ids = rs.randint(4, VOCAB, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row, n in enumerate(n_pad[:batch]):
        mask[row, :n] = 0
    ids[mask == 0] = 0
    return ids, mask


# ---------------------------------------------------------------------------- process_logits

PROCESSOR_CASES = {
    "repetition": dict(repetition_penalty=1.3),
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "qwen3": dict(temperature=0.6, top_k=20, top_p=0.95),
    "all": dict(repetition_penalty=1.2, temperature=0.7, top_k=12, top_p=0.9, min_p=0.05),
}


def _hf_processors(settings):
    """The processors transformers' generate builds for these settings, in its order."""
    chain = []
    if settings.get("repetition_penalty", 1.0) != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings.get("temperature", 1.0) != 1.0:
        chain.append(lp.TemperatureLogitsWarper(settings["temperature"]))
    if settings.get("top_k"):
        chain.append(lp.TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p", 1.0) < 1.0:
        chain.append(lp.TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p") is not None:
        chain.append(lp.MinPLogitsWarper(settings["min_p"]))
    return lp.LogitsProcessorList(chain)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROCESSOR_CASES))
def test_process_logits_matches_transformers_processors(name):
    settings = PROCESSOR_CASES[name]
    rs = np.random.RandomState(1)
    logits = (3.0 * rs.randn(4, 50)).astype(np.float32)  # positive and negative logits
    generated = rs.randint(0, 50, (4, 12)).astype(np.int64)
    generated[:, 3] = generated[:, 2]  # repeated ids are penalised once
    ref = _hf_processors(settings)(torch.tensor(generated), torch.tensor(logits)).numpy()
    ours = np.asarray(process_logits(logits, generated, **settings))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)
    if name in ("top_k", "top_p", "min_p", "qwen3", "all"):
        assert np.isinf(ref).any() and finite.sum(-1).min() >= 1  # the filter did something


def test_repetition_penalty_by_hand_and_masked_pads():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    generated = np.array([[0, 1, 3, 3]])
    mask = np.array([[True, True, False, True]])  # id 3 seen once as a real token
    out = np.asarray(process_logits(logits, generated, mask, repetition_penalty=2.0))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, 0.25]])
    mask = np.array([[False, True, True, False]])  # id 0 and 3 only under the mask's zeros
    out = np.asarray(process_logits(logits, generated, mask, repetition_penalty=2.0))
    np.testing.assert_allclose(out, [[2.0, -4.0, 1.0, 0.25]])  # id 3 still seen at column 2


def test_process_logits_defaults_are_identity_and_penalty_needs_ids():
    logits = np.random.RandomState(0).randn(2, 7).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(process_logits(logits)), logits)
    with pytest.raises(ValueError, match="generated token ids"):
        process_logits(logits, repetition_penalty=1.5)


# ---------------------------------------------------------------------------- config


QWEN3_0_6B_GENERATION_CONFIG = {  # Qwen/Qwen3-0.6B's published generation_config.json
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}


def test_generation_config_reads_qwen3_file_and_round_trips_through_transformers(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3_0_6B_GENERATION_CONFIG))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config == GenerationConfig.qwen3()
    assert config.eos_token_id == (151645, 151643)
    out = tmp_path / "saved"
    config.replace(min_p=0.05, repetition_penalty=1.1).save_pretrained(out)
    hf = transformers.GenerationConfig.from_pretrained(out)
    assert (hf.do_sample, hf.temperature, hf.top_k, hf.top_p) == (True, 0.6, 20, 0.95)
    assert (hf.min_p, hf.repetition_penalty) == (0.05, 1.1)
    assert hf.eos_token_id == [151645, 151643] and hf.pad_token_id == 151643
    assert GenerationConfig.from_pretrained(out / "generation_config.json") == config.replace(
        min_p=0.05, repetition_penalty=1.1
    )
    # One end token is written as an int, as transformers does; both forms are read.
    single = GenerationConfig(eos_token_id=7)
    assert single.eos_token_id == (7,) and single.to_dict()["eos_token_id"] == 7
    assert GenerationConfig.from_dict({"eos_token_id": 7, "top_k": None}).top_k == 50


@pytest.mark.slow
def test_generation_config_json_is_written_and_read_with_the_model(tiny, tmp_path):
    model, _ = tiny
    loaded = model.generation_config
    model.generation_config = GenerationConfig.qwen3().replace(eos_token_id=(3, 5), pad_token_id=0)
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config = loaded
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.do_sample, hf.temperature, hf.top_k, hf.top_p) == (True, 0.6, 20, 0.95)
    assert hf.eos_token_id == [3, 5]
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert reloaded.generation_config == GenerationConfig.qwen3().replace(
        eos_token_id=(3, 5), pad_token_id=0
    )
    # Without the attribute, save writes greedy defaults ending on the config's eos.
    bare = Qwen3ForCausalLM(model.config)
    bare.save_pretrained(tmp_path / "bare")
    assert GenerationConfig.from_pretrained(tmp_path / "bare") == GenerationConfig(
        eos_token_id=3, pad_token_id=0, bos_token_id=1
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_generation_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 33, 64, 65, 128, 129, 300, 512)] == [
        8, 8, 16, 16, 32, 64, 64, 128, 128, 192, 320, 512
    ]  # fmt: skip
    with pytest.raises(ValueError):
        bucket_length(0)


def test_chat_prompt_uses_the_tokenizer_template():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    messages = [{"role": "user", "content": "What is 2+3?"}]
    text = chat_prompt(tokenizer, messages, enable_thinking=False)
    assert text == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.startswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    no_turn = chat_prompt(tokenizer, messages, add_generation_prompt=False)
    assert no_turn == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"


# ---------------------------------------------------------------------------- generate


def test_right_padded_or_empty_prompts_are_rejected(tiny):
    model, _ = tiny
    ids, mask = _prompts(0)
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match=r"LEFT-padded.*\[1, 2\]"):
        generate(model, ids, right, max_new_tokens=4, eos_token_id=3, pad_token_id=0)
    empty = mask.copy()
    empty[0] = 0
    with pytest.raises(ValueError, match=r"LEFT-padded.*\[0\]"):
        generate(model, ids, empty, max_new_tokens=4, eos_token_id=3, pad_token_id=0)
    hole = np.ones_like(mask)
    hole[1, 4] = 0  # a pad between real tokens is not left padding either
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, hole, max_new_tokens=4, eos_token_id=3, pad_token_id=0)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1])
def test_token_ids_outside_the_vocabulary_are_rejected(tiny, bad):
    model, _ = tiny
    ids, mask = _prompts(0)
    ids[1, -1] = bad
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB - 1}\]"):
        generate(model, ids, mask, max_new_tokens=4, eos_token_id=3, pad_token_id=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, ids * 0 + 5, mask, max_new_tokens=4, eos_token_id=VOCAB, pad_token_id=0)


def test_stops_on_every_end_token_of_the_generation_config(tiny):
    model, _ = tiny
    ids, mask = _prompts(2)
    free = np.asarray(
        generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    )
    # Two end tokens: the 3rd token of row 0 and the 5th of row 1.
    ends = (int(free[0, 2]), int(free[1, 4]))
    assert ends[0] != ends[1]
    config = GenerationConfig(eos_token_id=ends, pad_token_id=0)
    out = np.asarray(generate(model, ids, mask, max_new_tokens=12, generation_config=config))
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(np.isin(row_free, ends))
        stop = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == 0).all()
    assert np.isin(out[0, :3], ends).any() and np.isin(out[1, :5], ends).any()
    # An explicit eos_token_id (int or list) replaces the config's, as in transformers.
    only_first = np.asarray(
        generate(
            model, ids, mask, max_new_tokens=12, generation_config=config, eos_token_id=ends[0]
        )
    )
    as_list = np.asarray(
        generate(
            model, ids, mask, max_new_tokens=12, generation_config=config, eos_token_id=[ends[0]]
        )
    )
    np.testing.assert_array_equal(only_first, as_list)
    # The model's own attribute (read from generation_config.json) is the default config.
    loaded = model.generation_config
    assert loaded.eos_token_id == (3,) and loaded.pad_token_id == 0  # transformers wrote it
    model.generation_config = config
    try:
        np.testing.assert_array_equal(
            np.asarray(generate(model, ids, mask, max_new_tokens=12)), out
        )
    finally:
        model.generation_config = loaded


@pytest.mark.slow  # ~30 s on the shared machine (compiles three programs)
def test_greedy_with_repetition_penalty_matches_transformers_generate(tiny):
    model, hf = tiny
    ids, mask = _prompts(3, n_pad=(0, 0, 0))  # transformers also penalises pad ids: no pads here
    kwargs = dict(max_new_tokens=20, eos_token_id=3, pad_token_id=0, repetition_penalty=1.5)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, **kwargs
        ).numpy()[:, ids.shape[1] :]
    ref = np.pad(ref, ((0, 0), (0, 20 - ref.shape[1])), constant_values=0)
    ours = np.asarray(generate(model, ids, mask, **kwargs))
    np.testing.assert_array_equal(ours, ref)
    plain = np.asarray(
        generate(model, ids, mask, max_new_tokens=20, eos_token_id=3, pad_token_id=0)
    )
    assert not np.array_equal(plain, ours)  # the penalty changed the continuation


def test_greedy_left_padded_matches_transformers_generate(tiny):
    model, hf = tiny
    ids, mask = _prompts(4)  # 9 columns, padded to the 16 bucket inside generate
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=11,
            do_sample=False,
            eos_token_id=3,
            pad_token_id=0,
        ).numpy()[:, 9:]
    ref = np.pad(ref, ((0, 0), (0, 11 - ref.shape[1])), constant_values=0)
    ours = np.asarray(generate(model, ids, mask, max_new_tokens=11, eos_token_id=3, pad_token_id=0))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow  # ~30 s on the shared machine (compiles three programs)
def test_sampling_top_k_one_is_greedy_and_sampling_is_seeded(tiny):
    model, _ = tiny
    ids, mask = _prompts(5)
    common = dict(max_new_tokens=10, eos_token_id=3, pad_token_id=0)
    greedy = np.asarray(generate(model, ids, mask, **common))
    top1 = np.asarray(
        generate(
            model,
            ids,
            mask,
            do_sample=True,
            temperature=2.0,
            top_k=1,
            rng=jax.random.key(3),
            **common,
        )
    )
    np.testing.assert_array_equal(top1, greedy)
    qwen3 = GenerationConfig.qwen3().replace(eos_token_id=(3,), pad_token_id=0)
    a = np.asarray(
        generate(
            model, ids, mask, max_new_tokens=10, generation_config=qwen3, rng=jax.random.key(0)
        )
    )
    b = np.asarray(
        generate(
            model, ids, mask, max_new_tokens=10, generation_config=qwen3, rng=jax.random.key(0)
        )
    )
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, max_new_tokens=10, generation_config=qwen3)
    # temperature=0 overrides a sampling config: greedy, no rng needed.
    np.testing.assert_array_equal(
        np.asarray(
            generate(model, ids, mask, max_new_tokens=10, generation_config=qwen3, temperature=0.0)
        ),
        greedy,
    )


@pytest.mark.slow
def test_calls_in_the_same_buckets_share_one_compiled_program(tiny):
    model, _ = tiny
    common = dict(eos_token_id=[], pad_token_id=0)
    ids9, mask9 = _prompts(6, length=9)
    ids12, mask12 = _prompts(7, length=12)
    generate(model, ids9, mask9, max_new_tokens=5, **common)  # may compile (first use here)
    before = compiled_program_count()
    out = generate(model, ids12, mask12, max_new_tokens=7, **common)  # same buckets: 16 and 8
    ids14, mask14 = _prompts(8, length=14)
    generate(model, ids14, mask14, max_new_tokens=8, **common)
    generate(model, ids14, mask14, max_new_tokens=8, eos_token_id=[3, 4, 5], pad_token_id=1)
    assert compiled_program_count() == before  # end tokens and pad id are not compiled in
    assert out.shape == (3, 7)
    ids17, mask17 = _prompts(9, length=17)  # bucket 32: one new program
    generate(model, ids17, mask17, max_new_tokens=5, **common)
    assert compiled_program_count() == before + 1
    assert generation._PROGRAMS_TRACED == compiled_program_count()
