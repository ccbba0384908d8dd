"""Stage-one evaluation: several tokenizers compared on one shared rFID reference (scripts/compare_tokenizers.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import random_tiny_tokenizer
from torchmetrics.image.fid import FrechetInceptionDistance

from stage1_tokenizer import metrics as metrics_module

from stage1_tokenizer.evaluation import (
    TokenizerComparisonConfig,
    compare_tokenizers,
    evaluate_tokenizer,
    metrics_table,
    resolve_run,
    run_comparison,
    training_curve,
)
from stage1_tokenizer.metrics import ReconstructionMetrics


class _Images(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int = 32):
        self.images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index]}


class _PooledColours(torch.nn.Module):
    """A stand-in for Inception (12 features: mean colour of each image quadrant): FID's bookkeeping
    without the Inception cost. The slow variants run the real network."""

    num_features = 12

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1).double()


@pytest.fixture(params=[pytest.param("stub"), pytest.param("inception", marks=pytest.mark.slow)])
def fid_features(request, monkeypatch):
    if request.param == "stub":
        def stub(reset_real_features=True):
            return FrechetInceptionDistance(feature=_PooledColours(), reset_real_features=reset_real_features), "stub"

        monkeypatch.setattr(metrics_module, "offline_frechet_inception_distance", stub)
    return request.param


def test_comparison_rows_equal_separate_evaluations(fid_features):
    """Sharing the real Inception statistics must not change any number: each row equals a fresh,
    separate evaluation of that tokenizer (its own real pass)."""
    dataset = _Images(5)
    tokenizers = {"a": random_tiny_tokenizer(0), "b": random_tiny_tokenizer(1)}
    results, counts, grid = compare_tokenizers(tokenizers, dataset, batch_size=2, grid_images=5)
    assert grid.shape == (3 * 5, 3, 32, 32)
    assert torch.equal(grid[:5], dataset.images)
    for name, tokenizer in tokenizers.items():
        alone, alone_counts, alone_grid = evaluate_tokenizer(tokenizer, dataset, batch_size=2, grid_images=5)
        for key in ("rfid", "lpips", "ssim", "psnr", "utilisation", "perplexity", "dead_codes"):
            assert results[name][key] == pytest.approx(alone[key], rel=1e-5, abs=1e-6), (name, key)
        assert torch.equal(counts[name], alone_counts)
    # The two untrained tokenizers differ, so a mix-up of rows would show.
    assert results["a"]["psnr"] != pytest.approx(results["b"]["psnr"], rel=1e-4)
    assert torch.equal(grid[10:], alone_grid[5:])  # the last row is b's reconstructions


def test_compare_tokenizers_needs_a_kept_reference():
    with pytest.raises(ValueError, match="keep_real_fid=True"):
        compare_tokenizers({"a": random_tiny_tokenizer()}, _Images(2), metrics=ReconstructionMetrics(with_fid=False))
    with pytest.raises(ValueError, match="no tokenizers"):
        compare_tokenizers({}, _Images(2))


def _training_output(root, name, seed, steps_per_second):
    folder = root / name
    random_tiny_tokenizer(seed).save_pretrained(folder / "tokenizer")
    (folder / "train_result.json").write_text(json.dumps({"steps": 7, "steps_per_second": steps_per_second}))
    return folder


def test_run_comparison_writes_table_pictures_and_speed_ratios(tmp_path, fid_features):
    runs = [_training_output(tmp_path, "vq", 0, 2.0), _training_output(tmp_path, "slow", 1, 0.5)]
    bare = tmp_path / "bare"
    random_tiny_tokenizer(2).save_pretrained(bare)
    cfg = TokenizerComparisonConfig(
        runs=[str(p) for p in [*runs, bare]], names=["vq", "slow", "bare"], dataset="synthetic-faces",
        image_size=32, dataset_num_images=40, num_images=3, batch_size=3, cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"), grid_images=2,
    )
    record = run_comparison(cfg)
    metrics = record["metrics"]
    assert list(metrics) == ["vq", "slow", "bare"]
    assert metrics["vq"]["train_time_vs_vq"] == pytest.approx(1.0)
    assert metrics["slow"]["train_time_vs_vq"] == pytest.approx(4.0)  # 2 s/step against 0.5 s/step
    assert metrics["bare"]["train_seconds_per_step"] is None and "train_time_vs_vq" not in metrics["bare"]
    assert record["recipe"]["rfid"]["num_real"] == 3  # one real pass for three rows
    assert record["grid_rows"] == ["input", "vq", "slow", "bare"]
    out = tmp_path / "out"
    table = (out / "comparison.md").read_text()
    assert "| slow |" in table and "train_time_vs_vq" in table and table.count("\n") == 5
    assert json.loads((out / "comparison.json").read_text())["metrics"]["slow"]["num_images"] == 3
    from PIL import Image

    with Image.open(out / "reconstructions.png") as picture:  # 4 rows of 2 images of 32 px (+ padding)
        assert picture.size[1] > 4 * 32 and picture.size[0] < 3 * 32 + 10
    assert (out / "code_usage.png").stat().st_size > 1000


def test_comparison_config_and_run_errors(tmp_path):
    with pytest.raises(ValueError, match="runs is empty"):
        TokenizerComparisonConfig()
    with pytest.raises(ValueError, match="one name per run"):
        TokenizerComparisonConfig(runs=["a", "b"], names=["a"])
    with pytest.raises(ValueError, match="neither a training output folder"):
        resolve_run(tmp_path)
    same = [_training_output(tmp_path, "x", 0, 1.0), _training_output(tmp_path, "y", 1, 1.0)]
    cfg = TokenizerComparisonConfig(runs=[str(p) for p in same], output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="two runs are named 'vq'"):
        run_comparison(cfg)


def test_metrics_table_marks_missing_columns():
    table = metrics_table({"a": {"rfid": 1.23456, "steps": 3}}, columns=("rfid", "steps", "psnr"))
    assert table.splitlines()[2] == "| a | 1.235 | 3 | - |"


def test_training_curve_merges_resumed_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(tmp_path / "logs" / "tokenizer" / "a")
    for step, value in ((375, 0.5), (750, 0.25)):
        first.add_scalar("usage/epoch_utilisation", value, step)
    first.add_scalar("loss/total", 9.0, 375)
    first.close()
    resumed = SummaryWriter(tmp_path / "logs" / "tokenizer" / "b")  # a resumed run repeats step 750
    for step, value in ((750, 0.75), (1125, 1.0)):
        resumed.add_scalar("usage/epoch_utilisation", value, step)
    resumed.close()
    assert training_curve(tmp_path) == [(375, 0.5), (750, 0.75), (1125, 1.0)]
    assert training_curve(tmp_path, "loss/total") == [(375, 9.0)]
    assert training_curve(tmp_path, "no/such/tag") == []
    assert training_curve(tmp_path / "missing") == []
