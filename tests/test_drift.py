"""Drift benchmark: the streams drift as specified, the k-means reference is right, the benchmark runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stage1_tokenizer.drift import (
    NSVQ_TAUS,
    DriftBenchmarkConfig,
    LatentStream,
    ShrinkingStream,
    StreamStep,
    TranslationStream,
    build_stream,
    codebook_mse,
    kmeans,
    quantize_rows,
    quantizer_variants,
    run_drift_benchmark,
    train_on_stream,
    write_report,
)
from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer


def test_translation_mean_moves_along_a_straight_path():
    stream = TranslationStream(dim=4, steps=11, batch_size=8, seed=0, travel=5.0)
    assert torch.equal(stream.mean(0), torch.zeros(4))
    assert math.isclose(stream.mean(10).norm().item(), 5.0, rel_tol=1e-5)
    assert torch.allclose(stream.mean(5), stream.mean(10) / 2)
    sample = stream.sample(10, 20000, torch.Generator().manual_seed(1))
    assert torch.allclose(sample.mean(0), stream.mean(10), atol=0.05)
    assert torch.allclose(sample.std(0), torch.ones(4), atol=0.05)


def test_translation_x4_is_the_same_drift_four_times_larger():
    plain = build_stream("translation", dim=4, steps=11, batch_size=8, seed=0)
    large = build_stream("translation_x4", dim=4, steps=11, batch_size=8, seed=0)
    assert torch.allclose(large.mean(10), 4 * plain.mean(10))
    assert large.scale(3) == 4 * plain.scale(3)
    assert torch.allclose(large.final_latents(100), 4 * plain.final_latents(100), atol=1e-5)


def test_shrinking_scale_decays_geometrically_and_mean_stays():
    stream = ShrinkingStream(dim=4, steps=11, batch_size=8, seed=0, final_ratio=0.1)
    assert stream.scale(0) == 1.0
    assert math.isclose(stream.scale(10), 0.1)
    assert math.isclose(stream.scale(5), math.sqrt(0.1))
    for step in (0, 10):
        sample = stream.sample(step, 20000, torch.Generator().manual_seed(1))
        assert sample.mean(0).abs().max() < 0.05 * stream.scale(step)
        assert torch.allclose(sample.std(0), torch.full((4,), stream.scale(step)), rtol=0.05)
    assert torch.allclose(stream.final_latents(20000).std(0), torch.full((4,), 0.1), rtol=0.05)


def test_synthetic_streams_feed_the_quantizer_their_own_latents():
    stream = build_stream("translation", dim=4, steps=5, batch_size=16, seed=0)
    quantizer = build_quantizer("vq", codebook_size=8, dim=4)
    result = stream.step(quantizer, 4)
    assert result.latents.shape == (16, 4) and result.indices.shape == (16,)
    assert math.isclose(result.latents.mean(0).norm().item(), 5.0, rel_tol=0.15)


def test_autoencoder_latents_drift_because_the_encoder_learns():
    torch.manual_seed(0)
    stream = build_stream("autoencoder", dim=4, steps=20, batch_size=64, seed=0)
    quantizer = build_quantizer("vq", codebook_size=16, dim=4)
    probe = stream.data(256, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = stream.encoder(probe)
    train_on_stream(stream, quantizer, DriftBenchmarkConfig(steps=20), stream.learning_rate)
    with torch.no_grad():
        after = stream.encoder(probe)
    # Both where the cloud sits and how wide it is change: the drift is the encoder's own learning.
    assert (after.mean(0) - before.mean(0)).norm() > before.std(0).norm()
    assert after.std(0).norm() > 3 * before.std(0).norm()


class CyclingStream(LatentStream):
    """Latents equal to code (step % 4) for the first 8 steps, code 0 afterwards: a known usage history."""

    def __init__(self, codes):
        super().__init__(dim=codes.shape[1], steps=12, batch_size=1, seed=0)
        self.codes = codes

    def step(self, quantizer, step):
        latents = self.codes[[step % 4 if step < 8 else 0]]
        out = quantize_rows(quantizer, latents)
        return StreamStep(loss=out.loss, latents=latents, indices=out.indices.reshape(-1))

    def final_latents(self, num):
        return self.codes[[0] * num]


def test_window_utilisation_counts_codes_chosen_in_the_last_steps():
    quantizer = build_quantizer("vq", codebook_size=4, dim=2)
    codes = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    quantizer.embedding.weight.data.copy_(codes)
    config = DriftBenchmarkConfig(steps=12, window=2)
    steps, utilisation, final = train_on_stream(CyclingStream(codes), quantizer, config, learning_rate=1e-6)
    by_step = dict(zip(steps, utilisation))
    assert by_step[0] == 0.25 and by_step[3] == 0.5 and by_step[7] == 0.5
    assert by_step[8] == 0.5  # steps 7 and 8 chose codes 3 and 0
    assert by_step[9] == 0.25 and final == 0.25


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres.repeat_interleave(200, 0) + 0.1 * torch.randn(600, 2, generator=g))
    found = kmeans(points, 3, iterations=10, generator=torch.Generator().manual_seed(1))
    distance_to_truth = torch.cdist(centres, found).min(dim=1).values
    assert (distance_to_truth < 0.05).all()
    assert math.isclose(codebook_mse(points, found), 0.01, rel_tol=0.2)


def test_kmeans_with_one_centre_per_distinct_point_has_zero_error():
    points = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    found = kmeans(points, 32, iterations=3, generator=torch.Generator().manual_seed(0))
    assert codebook_mse(points, found) == 0.0


def test_codebook_mse_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    points, codebook = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    brute = torch.stack([((points - c) ** 2).sum(1) for c in codebook]).min(0).values
    assert math.isclose(codebook_mse(points, codebook), (brute.mean() / 3).item(), rel_tol=1e-5)


def test_kmeans_rejects_too_few_points():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(4, 2), 5)


def test_variants_cover_the_registry_and_the_nsvq_sweep():
    variants = quantizer_variants(list(QUANTIZERS))
    assert {v.name for v in variants} == set(QUANTIZERS)
    if "nsvq" in QUANTIZERS:
        labels = [v.label for v in variants if v.name == "nsvq"]
        assert labels == [f"nsvq tau={t:g}" for t in NSVQ_TAUS] + ["nsvq relative tau=1"]
    for v in variants:  # every variant's options are accepted by its quantizer
        build_quantizer(v.name, codebook_size=8, dim=4, **v.options)


@pytest.mark.parametrize(
    "bad",
    [
        {"streams": ["nowhere"]},
        {"sizes": [1]},
        {"steps": 0},
        {"steps": 10, "window": 11},
        {"quantizers": ["nope"]},
        {"learning_rate": -1.0},
    ],
)
def test_bad_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        run_drift_benchmark(DriftBenchmarkConfig(**bad), progress=False)


def test_tiny_benchmark_end_to_end(tmp_path):
    config = DriftBenchmarkConfig(
        streams=["translation", "autoencoder"], sizes=[8], steps=6, batch_size=32, kmeans_iterations=2,
        min_eval_samples=256,
    )
    results = run_drift_benchmark(config, progress=False)
    labels = [v.label for v in quantizer_variants(list(QUANTIZERS))]
    assert [(r.stream, r.codebook_size, r.label) for r in results] == [
        (stream, 8, label) for stream in config.streams for label in labels
    ]
    for r in results:
        assert 0 < r.utilisation_window <= 1 and 0 < r.utilisation_final <= 1
        assert r.mse > 0 and r.kmeans_mse > 0
        assert len(r.curve_steps) == len(r.curve_utilisation) == 6
        assert r.learning_rate == build_stream(r.stream, 4, 6, 32, 0).learning_rate
    # The synthetic stream's final distribution, hence its k-means reference, is shared by all variants.
    assert len({r.kmeans_mse for r in results if r.stream == "translation"}) == 1
    paths = write_report(results, config, tmp_path, command="pytest")
    rows = [line for line in paths["table"].read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(results)
    assert rows[1].startswith("| translation | 8 | " + labels[0] + " |")
    payload = json.loads(paths["json"].read_text())
    assert len(payload["runs"]) == len(results) and payload["config"]["window"] == 1
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
