"""VQ-GAN losses: hinge values by hand, the adaptive weight against hand-derived gradients, term switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.losses import (
    PatchGANDiscriminator,
    VQGANLoss,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, -0.5, 0.5])  # relu(1 - x) = 0, 1.5, 0.5 -> mean 2/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2 / 3 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x, target, v = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)
    y = layer(x)
    rec = (y - target).pow(2).mean()
    g = -(y * v).mean()
    # d rec / dW = 2 / (N * 2) * (y - t)^T x;   d g / dW = -1 / (N * 2) * v^T x
    rec_grad = 2 / 8 * (y - target).detach().t() @ x
    g_grad = -1 / 8 * v.t() @ x
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_generator_weight(rec, g, layer.weight)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (rec + g).backward()  # both graphs are still there for the real backward pass
    assert adaptive_generator_weight((layer(x) - target).pow(2).mean(), -(layer(x) * v).mean() * 1e-9,
                                     layer.weight, max_weight=7.0).item() == 7.0


def test_adaptive_weight_needs_a_trainable_layer():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="require grad"):
        adaptive_generator_weight(w.sum(), w.sum(), w)


@pytest.mark.parametrize("size, layers, expected", [(64, 3, 6), (32, 3, 2), (64, 2, 14)])
def test_discriminator_output_shape(size, layers, expected):
    d = PatchGANDiscriminator(in_channels=3, base_channels=8, num_layers=layers)
    assert d(torch.zeros(2, 3, size, size)).shape == (2, 1, expected, expected)


def test_discriminator_is_batch_independent():
    """GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of the batch, which is what
    lets the discriminator step score real and fake images in one forward pass."""
    torch.manual_seed(0)
    d = PatchGANDiscriminator(base_channels=16)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(d(x)[:1], d(x[:1]))
    with pytest.raises(ValueError, match="positive integer"):
        PatchGANDiscriminator(num_layers=0)


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv_out(x))


def _batch():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return real, torch.tensor(0.3)


def test_zero_weights_remove_terms_and_networks():
    loss = VQGANLoss(pixel_loss="mse", perceptual_weight=0, gan_weight=0, quantizer_weight=2.0)
    assert loss.perceptual is None and loss.discriminator is None
    torch.manual_seed(0)
    decoder = _TinyDecoder()
    real, q = _batch()
    recon = decoder(real)
    total, logs = loss.generator_loss(real, recon, q, step=0)
    assert set(logs) == {"pixel", "quantizer", "total"}
    torch.testing.assert_close(total, F.mse_loss(recon, real) + 2.0 * q)
    assert not loss.gan_active(10**6)
    with pytest.raises(ValueError, match="no discriminator"):
        loss.discriminator_loss(real, recon, step=0)

    only_quantizer = VQGANLoss(pixel_weight=0, perceptual_weight=0, gan_weight=0)
    total, logs = only_quantizer.generator_loss(real, recon, q, step=0)
    assert set(logs) == {"quantizer", "total"} and total.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="adaptive GAN weight"):
        VQGANLoss(pixel_weight=0, perceptual_weight=0)
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGANLoss(pixel_loss="huber", perceptual_weight=0)
    with pytest.raises(ValueError, match="finite number"):
        VQGANLoss(gan_weight=-1.0, perceptual_weight=0)


def test_gan_term_starts_at_start_step_with_adaptive_weight():
    torch.manual_seed(0)
    loss = VQGANLoss(perceptual_weight=0, gan_weight=0.5, gan_start_step=100, discriminator_channels=8)
    decoder = _TinyDecoder()
    real, q = _batch()

    recon = decoder(real)
    total, logs = loss.generator_loss(real, recon, q, step=99, last_layer_weight=decoder.conv_out.weight)
    torch.testing.assert_close(total, F.l1_loss(recon, real) + q)
    assert logs["gan_generator"].item() == 0 and logs["gan_adaptive_weight"].item() == 0
    d_loss, d_logs = loss.discriminator_loss(real, recon, step=99)
    assert d_loss.item() == 0 and d_loss.requires_grad

    recon = decoder(real)
    total, logs = loss.generator_loss(real, recon, q, step=100, last_layer_weight=decoder.conv_out.weight)
    rec = F.l1_loss(recon, real)
    g = -loss.discriminator(recon).mean()
    weight = adaptive_generator_weight(rec, g, decoder.conv_out.weight)
    torch.testing.assert_close(logs["gan_adaptive_weight"], weight)
    torch.testing.assert_close(total, rec + q + 0.5 * weight * g)
    total.backward()
    assert decoder.conv_out.weight.grad is not None

    d_loss, d_logs = loss.discriminator_loss(real, recon, step=100)
    expected = hinge_d_loss(loss.discriminator(real), loss.discriminator(recon.detach()))
    torch.testing.assert_close(d_loss, expected)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())

    with pytest.raises(ValueError, match="last_layer_weight"):
        loss.generator_loss(real, decoder(real), q, step=100)
    with torch.no_grad():  # validation: no gradients, no adaptive weight, GAN term left out of the total
        total, logs = loss.generator_loss(real, decoder(real), q, step=100)
    torch.testing.assert_close(total, F.l1_loss(decoder(real), real) + q)


def test_fixed_gan_weight_and_perceptual_term():
    torch.manual_seed(0)
    loss = VQGANLoss(perceptual_weight=0.5, gan_weight=0.1, adaptive_gan_weight=False, discriminator_channels=8)
    decoder = _TinyDecoder()
    real, q = _batch()
    recon = decoder(real)
    total, logs = loss.generator_loss(real, recon, q, step=0)
    perceptual = loss.perceptual(recon, real).mean()
    expected = F.l1_loss(recon, real) + 0.5 * perceptual + q - 0.1 * loss.discriminator(recon).mean()
    torch.testing.assert_close(total, expected)
    assert logs["gan_adaptive_weight"].item() == 1.0
    assert loss.perceptual.net == "vgg"
