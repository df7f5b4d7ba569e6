"""The LoRA step benchmark runs end to end on CPU in its tiny shape: every side in its own
subprocess steps, its figures are filled in, the trainable counts are the adapters' (or every
weight), and the table and the protocol's verdict are printed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import lora_step
from step_sides import lora_side_settings


@pytest.mark.slow
def test_tiny_shape_reports_every_side(capsys):
    rows = {r["side"]: r for r in lora_step.main(["--shape", "tiny", "--steps", "7"])}
    assert list(rows) == list(lora_step.LORA_SIDES)
    for r in rows.values():
        assert len(r["times"]) == 7 and min(r["times"]) > 0
        assert r["peak_rss_gib"] > 0 and r["xla_temp_gib"] >= 0 and r["compile_s"] > 0
    config = lora_step.model_config("tiny")
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    # r * (in + out) per projection: q, k, v, o, gate, up, down
    per_rank = layers * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    for side, rank in (("lora-8", 8), ("lora-256", 256), ("lora-8-bf16base", 8)):
        assert rows[side]["trainable_params"] == rank * per_rank
    full = rows["full-adamw"]
    assert full["trainable_params"] == full["num_params"]
    assert rows["lora-8"]["num_params"] == full["num_params"] + 8 * per_rank
    printed = capsys.readouterr().out
    assert "| side | trainable params" in printed and "| lora-256 |" in printed
    assert "load average before" in printed and "load average after" in printed
    assert ("clean: yes" in printed) or ("clean: NO" in printed)


def test_side_names_give_rank_and_base_dtype():
    assert lora_side_settings("full-adamw") == (None, None)
    assert lora_side_settings("lora-256") == (256, None)
    assert lora_side_settings("lora-8-bf16base") == (8, "bfloat16")


@pytest.mark.parametrize(
    "argv",
    [
        ["--shape", "tiny", "--steps", "3"],
        ["--shape", "tiny", "--seq", "30"],
        ["--shape", "tiny", "--sides", "lora-8,lora-16"],
    ],
)
def test_bad_arguments_exit_2_before_any_work(argv):
    with pytest.raises(SystemExit) as exit_info:
        lora_step.main(argv)
    assert exit_info.value.code == 2
