"""Evaluation: the exact / gsm8k metrics, end tokens, the teacher-forced eval loss, and the
tokenizer a config resolves to."""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

import json
import types
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.generation import GenerationConfig, generate
from hacbo_jax.data import gsm8k as data
from hacbo_jax.trainer.config import ConfigError, config_from_dict
from hacbo_jax.data.gsm8k import Example
from hacbo_jax.trainer.evaluate import (
    end_token_ids,
    eval_arrays,
    evaluate_exact_match,
    greedy_completions,
    make_eval_loss,
)
from hacbo_jax.data.exact_match import exact_match_score, is_exact_match, normalize_text
from support.checkpoints import make_tiny_checkpoint

ASSETS = ASSETS_DIR
QWEN3_TOKENIZER = ASSETS / "qwen3-tokenizer"

# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, ignore_case, match",
    [
        ("Paris", "Paris", False, True),  # False under the gsm8k rule
        (" Paris\n", "Paris", False, True),  # surrounding whitespace stripped
        ("New   York\ncity", "New York city", False, True),  # inner runs collapse to one space
        ("paris", "Paris", False, False),  # case-sensitive by default
        ("paris", "PARIS", True, True),  # ... unless ignore_case
        ("Paris.", "Paris", False, False),  # punctuation counts
        ("Paris is the capital", "Paris", False, False),  # whole text, not a search
        ("", "", False, True),
    ],
)
def test_exact_metric(prediction, reference, ignore_case, match):
    assert is_exact_match(prediction, reference, metric="exact", ignore_case=ignore_case) is match


def test_gsm8k_metric_unchanged_and_unknown_metric_rejected():
    assert is_exact_match("Paris", "Paris") is False  # no number: the gsm8k rule has no answer
    assert is_exact_match("#### 72.0", "#### 72") and not is_exact_match(
        "#### 72.0", "#### 72", metric="exact"
    )
    assert normalize_text("  A \t b\n", ignore_case=True) == "a b"
    assert exact_match_score(["Paris", "Rome"], ["Paris", "Oslo"], metric="exact") == 0.5
    with pytest.raises(ValueError, match="metric='bleu'"):
        is_exact_match("a", "a", metric="bleu")


def test_evaluation_scores_with_the_given_metric(monkeypatch):
    from hacbo_jax.trainer import evaluate as evaluate_lib

    monkeypatch.setattr(evaluate_lib, "greedy_completions", lambda *a, **k: ["Paris", "#### 3"])
    examples = [Example("Capital?", "Paris"), Example("1+2?", "#### 3")]
    kwargs = {"batch_size": 2, "prompt_len": 8, "max_new_tokens": 4}
    gsm8k = evaluate_exact_match(None, None, examples, **kwargs)
    exact = evaluate_exact_match(None, None, examples, metric="exact", **kwargs)
    assert gsm8k.correct.tolist() == [False, True] and exact.correct.tolist() == [True, True]


def test_run_parts_evaluation_uses_the_configured_metric(monkeypatch):
    """RunParts.evaluate (final / per-epoch evaluation AND the micro-dev buffer's "solved"
    test, loop.refresh_microdev) passes the configured metric and the end tokens."""
    from hacbo_jax.trainer import run_parts

    seen = {}
    monkeypatch.setattr(run_parts, "evaluate_exact_match", lambda *a, **k: seen.update(k))
    cfg = config_from_dict(
        {"data": {"format": "prompt_completion"}, "eval": {"ignore_case": True}},
        check_paths=False,
    )
    parts = types.SimpleNamespace(
        cfg=cfg, tokenizer=None, prompt_len=16, end_tokens=(1, 7), model_at=lambda p: None
    )
    parts.metric = run_parts.RunParts.metric.fget(parts)
    run_parts.RunParts.evaluate(parts, {}, [])
    assert (seen["metric"], seen["ignore_case"], seen["end_tokens"]) == ("exact", True, (1, 7))


# -- end tokens ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM

    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return Qwen3ForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_end_tokens_of_the_shipped_qwen3_tokenizer():
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    no_generation_config = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=151645))
    # A checkpoint naming only <|im_end|> still stops on <|endoftext|> with Qwen3's tokenizer.
    assert end_token_ids(no_generation_config, qwen3) == (151645, 151643)
    model = types.SimpleNamespace(generation_config=GenerationConfig(eos_token_id=(5, 151643)))
    assert end_token_ids(model, qwen3) == (5, 151643, 151645)


@pytest.mark.slow
def test_greedy_evaluation_stops_on_every_generation_config_end_token(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    assert end_token_ids(model, tokenizer) == (eos,)
    questions = ["1 + 2 = ?", "What is 7 - 3?"]
    batch = next(data.prompt_batches(questions, tokenizer, batch_size=2, prompt_len=16))
    pad = tokenizer.pad_token_id
    free = np.asarray(  # no end token at all: the model's first six greedy tokens
        generate(
            model,
            batch.input_ids,
            batch.attention_mask,
            max_new_tokens=6,
            eos_token_id=(),
            pad_token_id=pad,
        )
    )
    special = set(tokenizer.all_special_ids)
    rows = [r for r in range(2) if free[r, 0] not in special and free[r, 1] != eos]
    assert rows, f"the random model starts with special tokens: {free[:, :2]}"
    row, first = rows[0], int(free[rows[0], 0])
    kwargs = {"batch_size": 2, "prompt_len": 16, "max_new_tokens": 6}
    before = greedy_completions(model, tokenizer, questions, **kwargs)
    tokens = free[row].tolist()
    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    assert before[row] == tokenizer.decode(tokens, skip_special_tokens=True)
    # The model's generation config also ends on `first`: that row stops right after it.
    model.generation_config = GenerationConfig(eos_token_id=(first,))
    try:
        assert end_token_ids(model, tokenizer) == (first, eos)
        after = greedy_completions(model, tokenizer, questions, **kwargs)
    finally:
        del model.generation_config
    assert after[row] == tokenizer.decode([first], skip_special_tokens=True)
    assert len(after[row]) < len(before[row])


# -- the evaluation loss ------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_loss_is_the_token_weighted_mean_over_trained_tokens(tiny):
    from hacbo_jax.trainer.step import make_loss_fn

    model, tokenizer = tiny
    examples = [Example("1 + 1 = ?", "#### 2"), Example("5 - 2 = ?", "3 #### 3"), Example("q", "a")]
    arrays = eval_arrays(examples, tokenizer, 24)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    # Batch size 2 over 3 examples: the padded fourth row must not count.
    eval_loss = make_eval_loss(make_loss_fn(graphdef, rest), arrays, batch_size=2)
    logits = np.asarray(model(arrays.input_ids, arrays.attention_mask), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, arrays.targets[..., None].astype(np.int64), -1)[..., 0]
    expected = (nll * arrays.loss_mask).sum() / arrays.loss_mask.sum()
    assert eval_loss(params) == pytest.approx(expected, rel=1e-5)
    chunked = make_eval_loss(make_loss_fn(graphdef, rest, logits_chunk=8), arrays, batch_size=3)
    assert chunked(params) == pytest.approx(expected, rel=1e-5)


# -- which tokenizer ----------------------------------------------------------------------------


def model_dir(
    tmp_path: Path, model_type: str, with_tokenizer: bool = False, vocab_size: int = 151_936
) -> Path:
    d = tmp_path / f"{model_type}_{vocab_size}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": vocab_size}))
    if with_tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def test_tokenizer_resolution(tmp_path):
    qwen3 = model_dir(tmp_path, "qwen3")
    cfg = config_from_dict({"model": {"path": str(qwen3)}})
    assert Path(cfg.model.tokenizer) == QWEN3_TOKENIZER.resolve()
    # A small Qwen3 that lost its own tokenizer cannot use the 151,669-token Qwen3 one.
    small = model_dir(tmp_path, "qwen3", vocab_size=320)
    with pytest.raises(ConfigError, match=r"model.tokenizer = null: .*vocab_size 320 is smaller"):
        config_from_dict({"model": {"path": str(small)}})
    own = model_dir(tmp_path, "qwen2", with_tokenizer=True)
    assert config_from_dict({"model": {"path": str(own)}}).model.tokenizer == str(own.resolve())
    explicit = config_from_dict(
        {"model": {"path": str(own), "tokenizer": "assets/qwen3-tokenizer"}}
    )
    assert Path(explicit.model.tokenizer) == QWEN3_TOKENIZER.resolve()
    hub = config_from_dict({"model": {"path": str(own), "tokenizer": "Qwen/Qwen3-0.6B"}})
    assert hub.model.tokenizer == "Qwen/Qwen3-0.6B"
    llama = model_dir(tmp_path, "llama")
    with pytest.raises(ConfigError, match=r"model.tokenizer = null: .*'llama', not 'qwen3'"):
        config_from_dict({"model": {"path": str(llama)}})
    with pytest.raises(ConfigError, match="model.tokenizer = .*must be a tokenizer directory"):
        config_from_dict({"model": {"path": str(own), "tokenizer": str(llama)}})
    with pytest.raises(ConfigError, match="model.tokenizer = 'nowhere/at/all': no such local"):
        config_from_dict({"model": {"path": str(own), "tokenizer": "nowhere/at/all"}})


def test_paper_configs_use_the_shipped_tokenizer_and_cover_gsm8k_answers():
    from hacbo_jax.trainer.config import load_config

    for name in ("paper_hacbo", "paper_hacbo_fixed", "paper_blac", "adamw"):
        cfg = load_config(name)
        assert Path(cfg.model.tokenizer) == QWEN3_TOKENIZER.resolve(), name
        assert cfg.eval.max_new_tokens >= 404, name  # longest GSM8K test reference: 404 tokens
        assert cfg.eval.resolved_metric(cfg.data.format) == "gsm8k"


def test_gsm8k_reference_answers_fit_the_paper_decoding_budget():
    """26 of the 1,319 GSM8K test references need more than 256 Qwen3 tokens with their EOS,
    the longest 404: the paper configs' 512 covers every one."""
    from transformers import AutoTokenizer

    from hacbo_jax.trainer.config import load_config

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    test = data.load_gsm8k("test")
    targets = data.token_ids(tokenizer, [data.format_target(e.answer) for e in test])
    lengths = np.array([len(t) + 1 for t in targets])  # + EOS, which ends the decoding
    assert (len(lengths), int((lengths > 256).sum()), int(lengths.max())) == (1319, 26, 404)
    assert load_config("paper_hacbo").eval.max_new_tokens >= lengths.max()
