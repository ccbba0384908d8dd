"""The end-to-end job: config presets and overrides (fast), a whole tiny run and its resume (slow)."""

import json
from pathlib import Path

import pytest
import yaml

from pipelines.end_to_end import build_config, parse_overrides, run_end_to_end

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo_tiny.yaml"


def test_overrides_are_parsed_as_yaml_scalars():
    parsed = parse_overrides(["tokenizer.max_steps=50", "tokenizer.quantizer=vq", "output_dir=/x",
                              "evaluation.top_p=0.9", "tokenizer.quantizer_options={tau: 2.0}"])
    assert parsed == {"tokenizer": {"max_steps": 50, "quantizer": "vq", "quantizer_options": {"tau": 2.0}},
                      "output_dir": "/x", "evaluation": {"top_p": 0.9}}


@pytest.mark.parametrize("bad, message", [("tokenizer.max_steps", "section.key=value"),
                                          ("decoder.depth=3", "unknown section")])
def test_bad_overrides_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides([bad])


def test_demo_preset_builds_and_stage_folders_derive_from_output_dir(tmp_path):
    cfg = build_config(str(DEMO), [f"output_dir={tmp_path}", "tokenizer.quantizer=vq"])
    assert cfg.tokenizer.quantizer == "vq"
    assert cfg.tokenizer.output_dir == str(tmp_path / "tokenizer")
    assert cfg.prior.output_dir == str(tmp_path / "prior")
    assert cfg.prior.token_dataset == str(tmp_path / "tokens")
    assert cfg.prior.expected_tokenizer == str(tmp_path / "tokenizer" / "tokenizer")
    # The run keeps the exact config of every stage.
    written = yaml.safe_load((tmp_path / "configs" / "tokenizer.yaml").read_text())
    assert written["quantizer"] == "vq" and written["max_steps"] == cfg.tokenizer.max_steps


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_step"):
        build_config(str(DEMO), [f"output_dir={tmp_path}", "tokenizer.max_step=5"])
    with pytest.raises(ValueError, match="unknown top-level"):
        build_config(None, [f"output_dir={tmp_path}", "epochs=3"])
    with pytest.raises(ValueError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"))


TINY = ["tokenizer.max_steps=4", "tokenizer.num_images=200", "tokenizer.batch_size=8", "tokenizer.codebook_size=32",
        "tokenizer.checkpoint_every=2", "tokenizer.report_to=none", "prior.max_steps=4", "prior.batch_size=8",
        "prior.checkpoint_every=2", "prior.eval_every=2", "prior.report_to=none", "tokenize.batch_size=32",
        "evaluation.num_reference_images=4", "evaluation.num_generated_images=4", "evaluation.batch_size=4"]


@pytest.mark.slow
def test_whole_run_writes_everything_and_a_rerun_skips_finished_stages(tmp_path):
    cfg = build_config(str(DEMO), [f"output_dir={tmp_path}", *TINY])
    metrics = run_end_to_end(cfg)
    for name in ("metrics.json", "report.md", "samples.png", "reconstructions.png", "code_usage.png",
                 "pipeline/model_index.json"):
        assert (tmp_path / name).is_file(), name
    assert metrics["gfid"] > 0 and metrics["tokenizer"]["rfid"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["gfid"] == pytest.approx(metrics["gfid"])
    first = metrics["wall_time_seconds"]

    again = run_end_to_end(build_config(str(DEMO), [f"output_dir={tmp_path}", *TINY]))
    # Finished training stages are not run again: their accumulated wall time does not grow.
    assert again["wall_time_seconds"]["tokenizer_training"] == first["tokenizer_training"]
    assert again["wall_time_seconds"]["prior_training"] == first["prior_training"]
