"""The contract every quantizer in QUANTIZERS keeps (see stage1_tokenizer/quantizers/base.py).

Parametrised over the registry, so a quantizer registered later is held to the same contract.
"""

from __future__ import annotations

import math

import pytest
import torch

from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer
from stage1_tokenizer.quantizers.base import squared_distances

K, D = 32, 8
NAMES = sorted(QUANTIZERS)
# fc projects down before its straight-through and up after it, so d quantized / d z is the product of the
# two projections (and the normalisation), not the identity.
NON_IDENTITY_STRAIGHT_THROUGH = {"fc"}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_quantizer(name, codebook_size=K, dim=D)


def latents(seed: int = 1, shape: tuple[int, ...] = (2, D, 4, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def near_tie_latents(codebook: torch.Tensor, count: int = 1024, seed: int = 2) -> torch.Tensor:
    """``[count // 64, D, 8, 8]`` latents scattered between the codes, where the nearest code is often a
    close call: codes plus noise on the scale of the code spacing."""
    g = torch.Generator().manual_seed(seed)
    codes = codebook.detach().float()
    picks = codes[torch.randint(codes.shape[0], (count,), generator=g)]
    flat = picks + codes.std() * torch.randn(count, codes.shape[1], generator=g)
    return flat.reshape(count // 64, 8, 8, codes.shape[1]).permute(0, 3, 1, 2).contiguous()


def flat_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_dtypes_and_ranges(name, training):
    q = make(name).train(training)
    z = latents()
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == (2, 4, 5) and out.indices.dtype == torch.long
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < K
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.perplexity.dim() == 0
    probs = torch.bincount(out.indices.flatten(), minlength=K).double() / out.indices.numel()
    entropy = -sum(p * math.log(p) for p in probs.tolist() if p > 0)
    assert out.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-5)
    assert q.codebook.shape == (K, D)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_embed_of_indices_is_the_forward_value(name, training):
    q = make(name).train(training)
    out = q(latents())
    torch.testing.assert_close(q.embed(out.indices), out.quantized, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_straight_through_gradient_reaches_latents(name):
    q = make(name).train()
    z = latents().requires_grad_()
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    (q(z).quantized * upstream).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    if name in NON_IDENTITY_STRAIGHT_THROUGH:
        assert (z.grad.abs().sum(1) > 0).all(), "every latent must receive a gradient"
    else:
        torch.testing.assert_close(z.grad, upstream, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_loss_moves_the_codebook(name):
    """Through the loss's gradient, or, for a quantizer without trainable parameters (ema), through the
    update it makes in a training-mode forward."""
    q = make(name).train()
    z = latents().requires_grad_()
    trainable = [p for p in q.parameters() if p.requires_grad]
    if trainable:
        q(z).loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    else:
        before = {k: v.clone() for k, v in q.state_dict().items()}
        q(z).loss.backward()
        assert any(not torch.equal(before[k], v) for k, v in q.state_dict().items())
    # The commitment term pulls the latents toward their codes.
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_changes_no_state(name):
    q = make(name).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(latents())
    after = q.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_argmin_under_bf16_autocast_is_the_float32_argmin(name, training):
    # Twin quantizers, each starting from the same state: a training-mode forward may update the codebook
    # (ema) and an eval-mode one may cache it; neither must carry over from one run to the other.
    reference_quantizer, mixed_quantizer = make(name).train(training), make(name).train(training)
    codes = make(name).eval().codebook.detach()
    z = near_tie_latents(codes)
    with torch.no_grad():
        reference = reference_quantizer(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = mixed_quantizer(z)
            # The data must be able to catch a bf16 argmin: a bf16 distance matmul flips some winners.
            naive = ((codes**2).sum(1) - 2 * flat_of(z) @ codes.t()).argmin(1)
    assert not torch.equal(naive, squared_distances(flat_of(z), codes).argmin(1))
    assert torch.equal(mixed.indices, reference.indices)
    assert mixed.quantized.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_bf16_latents_keep_their_dtype(name):
    q = make(name).eval()
    z = latents().bfloat16()
    with torch.no_grad():
        out = q(z)
        reference = q(z.float())
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, reference.indices)
    # The straight-through sum z + (q - z) rounds twice in bf16 (unit roundoff 2^-8) around terms as
    # large as |z| + |q|.
    error = (out.quantized.float() - reference.quantized).abs()
    assert (error <= 2 * 2**-8 * (z.float().abs() + reference.quantized.abs())).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_value_error(name):
    for size in (1, 0):
        with pytest.raises(ValueError, match="codebook_size"):
            build_quantizer(name, codebook_size=size, dim=D)
    with pytest.raises(ValueError, match="bad option"):
        build_quantizer(name, codebook_size=K, dim=D, no_such_option=1)
    q = make(name)
    with pytest.raises(ValueError, match="dim"):
        q(latents(shape=(2, D + 1, 4, 5)))
    with pytest.raises(ValueError, match=r"\[B, D, H, W\]"):
        q(latents(shape=(2, D, 4)))
    nan = latents()
    nan[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q(nan)


def test_unknown_quantizer_name_raises_value_error():
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("kmeans", codebook_size=K, dim=D)


@pytest.mark.parametrize("name", NAMES)
def test_set_step_leaves_the_lookup_alone(name):
    """Schedules (NS-VQ's tau) shape the loss; which code a latent gets never depends on the step."""
    q = make(name).eval()
    z = latents()
    before = q(z)
    for step in (0, 1, 10_000):
        q.set_step(step)
    after = q(z)
    assert torch.equal(after.indices, before.indices)
    assert torch.equal(after.quantized, before.quantized)
    assert torch.isfinite(after.loss)
    assert torch.isfinite(q.train()(z).loss)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_reproduces_the_output(name):
    z = latents()
    source = make(name, seed=0).train()
    trainable = [p for p in source.parameters() if p.requires_grad]
    out = source(z)
    if trainable:  # one training step, so the state differs from a fresh build
        (out.loss + out.quantized.square().mean()).backward()
        torch.optim.SGD(trainable, lr=0.5).step()
    source.eval()

    target = make(name, seed=1).eval()
    target(z)  # fill any eval-mode cache, which loading must invalidate
    assert not torch.equal(target.codebook, source.codebook), "a different seed must give a different codebook"
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        expected, actual = source(z), target(z)
    assert torch.equal(actual.indices, expected.indices)
    assert torch.equal(actual.quantized, expected.quantized)
    assert torch.equal(actual.loss, expected.loss)


# Quantizers whose codebook is computed (SimVQ, TransVQ) export it as a table; the others store one.
COMPUTED_CODEBOOK = [name for name in NAMES if hasattr(QUANTIZERS[name], "export_codebook")]


def test_computed_codebooks_are_exportable():
    assert {"simvq", "transvq"} <= set(COMPUTED_CODEBOOK)


@pytest.mark.parametrize("name", COMPUTED_CODEBOOK)
def test_exported_codebook_is_a_plain_vq_table(name):
    q = make(name).eval()
    table = q.export_codebook()
    assert table.shape == (K, D) and not table.requires_grad and table.grad_fn is None
    torch.testing.assert_close(table, q.codebook.detach(), atol=0, rtol=0)
    table.add_(1.0)  # a copy: writing to it leaves the quantizer alone
    assert not torch.equal(table, q.codebook.detach())

    plain = build_quantizer("vq", codebook_size=K, dim=D).eval()
    with torch.no_grad():
        plain.embedding.weight.copy_(q.export_codebook())
        z = near_tie_latents(q.codebook)
        assert torch.equal(plain(z).indices, q(z).indices)
        torch.testing.assert_close(plain(z).quantized, q(z).quantized, atol=0, rtol=0)
