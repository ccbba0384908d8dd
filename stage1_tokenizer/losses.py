"""The VQ-GAN training objective (Esser et al., "Taming Transformers", CVPR 2021, Sec. 3.1).

Generator side: pixel reconstruction + LPIPS perceptual loss + the quantizer's own loss + an adversarial term
from a PatchGAN discriminator, whose weight is set each step by the ratio of gradient norms at the decoder's
last layer. Discriminator side: hinge loss on real images and detached reconstructions. Every term has a
weight, and a weight of 0 removes the term (and any network it needs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import check_images, lpips_network

PixelLoss = Literal["l1", "mse"]
PIXEL_LOSSES: tuple[str, ...] = ("l1", "mse")

# GroupNorm groups in the discriminator: 32 as in diffusers' / taming's autoencoders, fewer for narrow layers.
_DISCRIMINATOR_GROUPS = 32
# Keeps the adaptive weight finite when the adversarial gradient vanishes (taming-transformers uses 1e-4).
_ADAPTIVE_WEIGHT_EPS = 1e-4


class PatchGANDiscriminator(nn.Module):
    """N-layer PatchGAN (Isola et al. 2017, pix2pix; the discriminator of taming-transformers).

    Four-by-four convolutions: one stride-2 conv without normalisation, ``num_layers - 1`` more stride-2 convs
    doubling the width (capped at 8x), one stride-1 conv, then a stride-1 conv to one logit per patch.

    Normalisation is GroupNorm rather than pix2pix's BatchNorm: a BatchNorm discriminator normalises real and
    fake batches with different statistics (which leaks which batch it is looking at), changes behaviour with
    the batch size (tiny on CPU), and needs SyncBatchNorm under data parallelism. GroupNorm is per sample, so
    real and fake can share one forward pass and the result does not depend on the batch.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv (64 in pix2pix and taming).
        num_layers: number of stride-2 convs (3 in pix2pix and taming: a 70x70 receptive field).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(_DISCRIMINATOR_GROUPS, out_channels), out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN initialisation (Radford et al. 2016), as pix2pix and taming use: conv N(0, 0.02), norm N(1, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> patch logits ``[B, 1, h, w]`` (h = H/2^num_layers - 2 for H divisible by it)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {tuple(images.shape)}")
        return self.layers(images)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss, ``(mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2``.

    The 1/2 keeps the scale of taming-transformers' implementation, so published weights carry over.
    """
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator side of the hinge GAN: ``-mean D(G(z))``."""
    return -fake_logits.mean()


def adaptive_generator_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, max_weight: float = 1e4
) -> Tensor:
    """``||grad_L rec_loss|| / (||grad_L g_loss|| + 1e-4)`` at the decoder's last layer L (Esser et al. 2021, Eq. 7).

    Balances the adversarial gradient against the reconstruction gradient where both enter the decoder, so
    the GAN weight needs no per-dataset tuning. Both graphs are retained for the backward pass that follows.

    Args:
        rec_loss: scalar reconstruction loss (pixel + perceptual).
        g_loss: scalar generator adversarial loss.
        last_layer_weight: the decoder's last conv weight (a leaf that requires grad).
        max_weight: upper clamp (1e4 in taming).

    Returns:
        A detached scalar in ``[0, max_weight]``.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("last_layer_weight must require grad: pass the decoder's last conv weight parameter")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + _ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, max_weight).detach()


def _check_pair(real: Tensor, recon: Tensor) -> None:
    check_images(real, "real")
    if recon.shape != real.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and real {tuple(real.shape)} must have the same shape")


def _check_weight(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns the term off), got {value!r}")
    return float(value)


class VQGANLoss(nn.Module):
    """VQ-GAN objective, one method per optimiser step.

    Generator step: ``pixel_weight * pixel + perceptual_weight * LPIPS-VGG + quantizer_weight * quantizer_loss
    + gan_weight * adaptive_weight * (-mean D(recon))``, the adversarial term from ``gan_start_step`` on.
    Discriminator step: ``hinge(D(real), D(recon.detach()))``.

    The discriminator lives here (``self.discriminator``; None when ``gan_weight`` is 0); give its parameters to
    their own optimiser, and zero its gradients before its step (the generator step also reaches them). Under
    data parallelism, wrap it and assign it back (``loss.discriminator = accelerator.prepare(loss.discriminator)``).

    Args:
        pixel_loss: ``"l1"`` (taming) or ``"mse"``.
        pixel_weight: weight of the pixel loss.
        perceptual_weight: weight of LPIPS with the VGG16 backbone (the VQGAN convention); 0 skips building it.
        quantizer_weight: weight of the quantizer's loss (its own terms are weighted inside the quantizer).
        gan_weight: weight of the adversarial term (0.8 in taming's configs); 0 builds no discriminator.
        gan_start_step: first step with adversarial terms; before it the autoencoder learns to reconstruct.
        adaptive_gan_weight: scale the adversarial term by :func:`adaptive_generator_weight`.
        max_adaptive_weight: clamp of the adaptive weight.
        discriminator_channels, discriminator_layers: :class:`PatchGANDiscriminator` size.
    """

    def __init__(
        self,
        pixel_loss: PixelLoss = "l1",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        gan_weight: float = 0.8,
        gan_start_step: int = 0,
        adaptive_gan_weight: bool = True,
        max_adaptive_weight: float = 1e4,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
    ):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
        if not isinstance(gan_start_step, int) or gan_start_step < 0:
            raise ValueError(f"gan_start_step must be an integer >= 0, got {gan_start_step!r}")
        self.pixel_loss = pixel_loss
        self.pixel_weight = _check_weight("pixel_weight", pixel_weight)
        self.perceptual_weight = _check_weight("perceptual_weight", perceptual_weight)
        self.quantizer_weight = _check_weight("quantizer_weight", quantizer_weight)
        self.gan_weight = _check_weight("gan_weight", gan_weight)
        self.max_adaptive_weight = _check_weight("max_adaptive_weight", max_adaptive_weight)
        self.gan_start_step = gan_start_step
        self.adaptive_gan_weight = adaptive_gan_weight
        if self.gan_weight > 0 and adaptive_gan_weight and self.pixel_weight == 0 and self.perceptual_weight == 0:
            raise ValueError(
                "the adaptive GAN weight is a ratio to the reconstruction gradient, which is 0 when pixel_weight "
                "and perceptual_weight are both 0; enable one of them or set adaptive_gan_weight=False"
            )
        self.perceptual = lpips_network("vgg") if self.perceptual_weight > 0 else None
        self.discriminator = (
            PatchGANDiscriminator(3, discriminator_channels, discriminator_layers)
            if self.gan_weight > 0
            else None
        )

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms count at ``step`` (trainers skip the discriminator step otherwise)."""
        return self.discriminator is not None and step >= self.gan_start_step

    def _pixel(self, real: Tensor, recon: Tensor) -> Tensor:
        if self.pixel_loss == "l1":
            return F.l1_loss(recon.float(), real.float())
        return F.mse_loss(recon.float(), real.float())

    def generator_loss(
        self,
        real: Tensor,
        recon: Tensor,
        quantizer_loss: Tensor,
        step: int,
        last_layer_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the tokenizer's step.

        Args:
            real: input images ``[B, 3, H, W]`` in ``[-1, 1]``.
            recon: the tokenizer's reconstruction, same shape, still attached to its graph.
            quantizer_loss: scalar, the quantizer output's ``loss``.
            step: global training step (decides whether the adversarial term is on).
            last_layer_weight: the decoder's last conv weight; needed for the adaptive GAN weight while
                gradients are enabled. Without gradients (validation) the adaptive weight is undefined and the
                adversarial term is logged but left out of the total, as in taming.

        Returns:
            The total loss (scalar) and the detached terms that make it up, for logging.
        """
        _check_pair(real, recon)
        logs: dict[str, Tensor] = {}
        rec_loss = recon.new_zeros((), dtype=torch.float32)
        if self.pixel_weight > 0:
            pixel = self._pixel(real, recon)
            rec_loss = rec_loss + self.pixel_weight * pixel
            logs["pixel"] = pixel.detach()
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, real).float().mean()
            rec_loss = rec_loss + self.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        total = rec_loss
        if self.quantizer_weight > 0:
            total = total + self.quantizer_weight * quantizer_loss.float()
            logs["quantizer"] = quantizer_loss.detach().float()
        if self.discriminator is not None:
            adversarial_weight = recon.new_zeros((), dtype=torch.float32)
            g_loss = recon.new_zeros((), dtype=torch.float32)
            if self.gan_active(step):
                g_loss = hinge_g_loss(self.discriminator(recon).float())
                if not self.adaptive_gan_weight:
                    adversarial_weight = torch.ones_like(adversarial_weight)
                elif torch.is_grad_enabled():
                    if last_layer_weight is None:
                        raise ValueError(
                            "the adaptive GAN weight needs last_layer_weight (the decoder's last conv weight); "
                            "pass it or set adaptive_gan_weight=False"
                        )
                    adversarial_weight = adaptive_generator_weight(
                        rec_loss, g_loss, last_layer_weight, self.max_adaptive_weight
                    )
                total = total + self.gan_weight * adversarial_weight * g_loss
            logs["gan_generator"] = g_loss.detach()
            logs["gan_adaptive_weight"] = adversarial_weight.detach()
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(self, real: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the discriminator's step: hinge loss on ``real`` and ``recon`` (detached here).

        Before ``gan_start_step`` the loss is multiplied by 0 (it still has a graph, so a trainer that does not
        check :meth:`gan_active` can call ``backward`` on it; checking saves the forward pass).

        Returns:
            The loss (scalar) and detached logs: the loss and the mean real / fake logits.
        """
        if self.discriminator is None:
            raise ValueError("gan_weight is 0, so there is no discriminator to train; skip the discriminator step")
        _check_pair(real, recon)
        # One forward pass for both: GroupNorm is per sample, so concatenating does not mix their statistics.
        logits = self.discriminator(torch.cat([real, recon.detach()])).float()
        real_logits, fake_logits = logits.chunk(2)
        loss = hinge_d_loss(real_logits, fake_logits)
        if not self.gan_active(step):
            loss = loss * 0.0
        logs = {
            "gan_discriminator": loss.detach(),
            "logits_real": real_logits.detach().mean(),
            "logits_fake": fake_logits.detach().mean(),
        }
        return loss, logs
