"""NS-VQ (stage1_tokenizer/quantizers/nsvq.py) against slow, dense float64 references of METHOD.md's formulas.

The references build the N x K x D tensor of differences explicitly; the implementation never does. Inputs
are float32 (what the quantizer sees), the references compute on them in float64. Errors are compared as
relative norms: ``|loss - ref| / |ref|`` and ``||grad - ref|| / ||ref||``.
"""

from __future__ import annotations

import math

import pytest
import torch

import stage1_tokenizer.quantizers.nsvq as nsvq
from stage1_tokenizer.quantizers import build_quantizer
from stage1_tokenizer.quantizers.tau_schedule import build_tau_schedule

# float32 distances carry a relative error of ~1e-7; the kernel amplifies it by d / tau, and the sums over
# N latents add ~sqrt(N) rounding steps. On the cases below (d / tau <= ~10) the worst measured error is
# 2.0e-7, so 1e-6 leaves room and still catches any wrong term (those are O(1e-2) and larger).
TOLERANCE = 1e-6


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def reference_weights(z: torch.Tensor, codes: torch.Tensor, tau: float, kernel_scale: float, winner: float):
    """METHOD.md's weights in float64, with the winner's weight set to ``winner`` (1: the loss; 0: W_soft)."""
    d = (z.double()[:, None, :] - codes.double()[None, :, :]).pow(2).sum(2)
    nearest = d.argmin(1)
    p = torch.softmax(-d / tau, dim=1)
    w = torch.clamp(kernel_scale * codes.shape[0] * p, max=1.0)
    w[torch.arange(z.shape[0]), nearest] = winner
    return w, nearest


def reference_loss(z, codes, tau, kernel_scale, alpha, beta):
    """``alpha L_emb + beta commitment`` and its gradients on the codes and the latents, float64, dense."""
    z64 = z.double().requires_grad_()
    c64 = codes.double().requires_grad_()
    w, nearest = reference_weights(z, codes, tau, kernel_scale, winner=1.0)
    n, dim = z.shape
    differences = z64.detach()[:, None, :] - c64[None, :, :]  # N x K x D, on purpose
    embedding = (w[:, :, None] * differences.pow(2)).sum() / (n * dim)
    commitment = (z64 - c64.detach()[nearest]).pow(2).mean()
    loss = alpha * embedding + beta * commitment
    grad_codes, grad_z = torch.autograd.grad(loss, (c64, z64))
    return loss.detach(), grad_codes, grad_z, nearest


def quantizer(codes: torch.Tensor, **options):
    q = build_quantizer("nsvq", codebook_size=codes.shape[0], dim=codes.shape[1], **options)
    with torch.no_grad():
        q.embedding.weight.copy_(codes)
    return q


def as_image(flat: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` -> ``[N, D, 1, 1]``: the quantizer's layout, one latent per image."""
    return flat[:, :, None, None].clone()


def random_problem(num_codes: int, num_latents: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Unit-variance vectors scaled by 1/sqrt(D): squared distances ~2 whatever D is.
    z = torch.randn(num_latents, dim, generator=g) / math.sqrt(dim)
    codes = torch.randn(num_codes, dim, generator=g) / math.sqrt(dim)
    return z, codes


def clustered_problem(seed: int = 0):
    """Four clusters of 64 codes, one per code group, and latents in two of them: every latent's kernel is
    dead (exactly 0) in at least two groups, so the sparse path has something to skip."""
    g = torch.Generator().manual_seed(seed)
    dim = 8
    centres = 3.0 * torch.randn(4, dim, generator=g)
    codes = (centres[:, None, :] + 0.5 * torch.randn(4, 64, dim, generator=g) / math.sqrt(dim)).reshape(256, dim)
    z = centres[torch.randint(2, (150,), generator=g)] + 0.5 * torch.randn(150, dim, generator=g) / math.sqrt(dim)
    return z, codes


# The clusters sit away from the origin, where float32 distances ||c||^2 - 2 z.c lose digits to cancellation
# (the argmin of every quantizer shares this): the kernel exponent's absolute error is ~eps (|z|^2 + |c|^2)
# / tau, and s_k c_k - m_k cancels again. Measured 1.5e-5 on both paths; a wrong term would be >= 1e-3.
CLUSTERED_TOLERANCE = 5e-5
CLUSTERED_TAU = 0.2

CASES = [  # K, N, D, tau, kernel_scale: K not a multiple of 64 (padding), clipping on and off
    (5, 40, 8, 2.0, 0.01),
    (64, 300, 16, 0.5, 0.2),
    (200, 120, 8, 1.0, 0.01),
    (1000, 60, 32, 0.5, 0.05),
]


@pytest.mark.parametrize("num_codes,num_latents,dim,tau,kernel_scale", CASES)
def test_loss_and_gradients_match_dense_float64_reference(num_codes, num_latents, dim, tau, kernel_scale):
    z, codes = random_problem(num_codes, num_latents, dim, seed=num_codes)
    q = quantizer(codes, tau=tau, tau_schedule="constant", kernel_scale=kernel_scale, alpha=0.7, beta=0.25)
    latents = as_image(z).requires_grad_()
    out = q(latents)
    out.loss.backward()
    loss, grad_codes, grad_z, nearest = reference_loss(z, codes, tau, kernel_scale, alpha=0.7, beta=0.25)
    assert torch.equal(out.indices.flatten(), nearest)
    assert abs(out.loss.item() - loss.item()) / loss.item() < TOLERANCE
    assert relative_error(q.codebook.grad, grad_codes) < TOLERANCE
    assert relative_error(latents.grad.flatten(1), grad_z) < TOLERANCE


def clustered_gradient(sparse_fraction: float, monkeypatch, **options):
    monkeypatch.setattr(nsvq, "SPARSE_PAIR_FRACTION", sparse_fraction)
    z, codes = clustered_problem()
    q = quantizer(codes, tau=CLUSTERED_TAU, tau_schedule="constant", kernel_scale=0.1, **options)
    out = q(as_image(z))
    out.loss.backward()
    return out.loss.detach(), q.codebook.grad


@pytest.mark.parametrize("sparse_fraction", [0.0, 1.0], ids=["dense-path", "sparse-path"])
def test_both_computation_paths_match_the_reference_where_groups_are_dead(monkeypatch, sparse_fraction):
    z, codes = clustered_problem()
    loss, grad = clustered_gradient(sparse_fraction, monkeypatch)
    expected_loss, expected_grad, _, _ = reference_loss(z, codes, CLUSTERED_TAU, 0.1, alpha=1.0, beta=0.25)
    # The far clusters' kernel weights lie below 2^-126: they get no pull at all (float64: < 1e-40).
    assert float(grad[128:].abs().max()) == 0.0
    assert float(expected_grad[128:].abs().max()) < 1e-40
    assert relative_error(grad, expected_grad) < CLUSTERED_TOLERANCE
    assert abs(loss.item() - expected_loss.item()) / expected_loss.item() < CLUSTERED_TOLERANCE


def test_sparse_path_equals_dense_path(monkeypatch):
    """Same float32 exponents on both paths; only the order of the sums differs (amplified by the same
    cancellation as above: measured 3e-6)."""
    dense_loss, dense_grad = clustered_gradient(0.0, monkeypatch)
    sparse_loss, sparse_grad = clustered_gradient(1.0, monkeypatch)
    assert abs(sparse_loss.item() - dense_loss.item()) / dense_loss.item() < CLUSTERED_TOLERANCE
    assert relative_error(sparse_grad, dense_grad.double()) < CLUSTERED_TOLERANCE


@pytest.mark.parametrize("tau", [1e-30, 1e-45], ids=["tiny", "inverse-overflows"])
def test_tau_to_zero_is_plain_vq(tau):
    z, codes = random_problem(300, 200, 16, seed=3)
    upstream = torch.randn(200, 16, 1, 1, generator=torch.Generator().manual_seed(4))
    results = []
    for name, options in (("nsvq", {"tau": tau, "tau_schedule": "constant"}), ("vq", {})):
        q = build_quantizer(name, codebook_size=300, dim=16, **options)
        with torch.no_grad():
            q.embedding.weight.copy_(codes)
        latents = as_image(z).requires_grad_()
        out = q(latents)
        (out.loss + (out.quantized * upstream).sum()).backward()
        results.append((out.indices, out.loss.detach(), q.codebook.grad, latents.grad))
    (ns_indices, ns_loss, ns_codes, ns_z), (vq_indices, vq_loss, vq_codes, vq_z) = results
    assert torch.equal(ns_indices, vq_indices)
    assert abs(ns_loss.item() - vq_loss.item()) / vq_loss.item() < TOLERANCE
    assert relative_error(ns_codes, vq_codes.double()) < TOLERANCE
    assert relative_error(ns_z, vq_z.double()) < TOLERANCE


def test_chunk_size_does_not_change_results():
    z, codes = random_problem(200, 250, 8, seed=5)
    reference = None
    for chunk_elements in (1, 64 * 256, 2**30):  # 32-row chunks (the minimum) with a partial one; 64; one
        q = quantizer(codes, tau=0.5, tau_schedule="constant", kernel_scale=0.1)
        out = q(as_image(z))
        out.loss.backward()
        result = (out.indices, out.loss.detach().double(), q.codebook.grad.double())
        if reference is None:
            reference = result
        assert torch.equal(result[0], reference[0])
        assert abs(result[1] - reference[1]) / reference[1] < 1e-6
        assert relative_error(result[2], reference[2]) < 1e-6


def test_schedules_give_the_documented_tau():
    exp = build_tau_schedule("exp", tau=2.0, decay_rate=0.5, decay_steps=100)
    assert [exp(s) for s in (0, 100, 200)] == [2.0, 1.0, 0.5]
    assert exp(250) == pytest.approx(2.0 * 0.5**2.5, rel=1e-12)
    step = build_tau_schedule("step", tau=10.0, gamma=0.1, step_size=500, warmup_steps=1000)
    assert [step(s) for s in (0, 999, 1499)] == [10.0, 10.0, 10.0]
    assert step(1500) == pytest.approx(1.0, rel=1e-12) and step(2000) == pytest.approx(0.1, rel=1e-12)
    epochs = build_tau_schedule("step", tau=1.0, gamma=0.5, step_size=10)  # the authors' 0.5 per epoch
    assert [epochs(s) for s in (9, 10, 29, 30)] == [1.0, 0.5, 0.25, 0.125]
    cosine = build_tau_schedule("cosine", tau=1.0, tau_min=0.1, total_steps=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.55, rel=1e-12)
    assert cosine(100) == pytest.approx(0.1, rel=1e-12) and cosine(10_000) == pytest.approx(0.1, rel=1e-12)
    constant = build_tau_schedule("constant", tau=0.3)
    assert constant(0) == constant(10**9) == 0.3


def test_set_step_moves_the_kernel_temperature():
    z, codes = random_problem(64, 100, 8, seed=6)
    scheduled = quantizer(codes, tau=2.0, tau_schedule="exp", decay_rate=0.5, decay_steps=100)
    scheduled.set_step(200)
    assert scheduled.current_tau == 0.5
    fixed = quantizer(codes, tau=0.5, tau_schedule="constant")
    assert torch.equal(scheduled(as_image(z)).loss, fixed(as_image(z)).loss)
    scheduled.set_step(0)
    assert scheduled(as_image(z)).loss.item() != fixed(as_image(z)).loss.item()


def test_paper_straight_through_value_and_gradients():
    z, codes = random_problem(64, 120, 8, seed=7)
    upstream = torch.randn(120, 8, 1, 1, generator=torch.Generator().manual_seed(8))
    grads = {}
    for mode in ("standard", "paper"):
        q = quantizer(codes, tau=0.5, tau_schedule="constant", straight_through=mode, alpha=0.7)
        latents = as_image(z).requires_grad_()
        out = q(latents)
        (out.loss + (out.quantized * upstream).sum()).backward()
        if mode == "paper":
            assert torch.equal(out.quantized, q.embed(out.indices))  # the forward value is exactly q
        grads[mode] = (q.codebook.grad, latents.grad, out.indices.flatten())
    (codes_standard, z_standard, indices), (codes_paper, z_paper, _) = grads["standard"], grads["paper"]
    assert torch.equal(z_paper, z_standard)  # the encoder still gets the straight-through gradient
    share = 2 * 0.7 / (120 * 8)  # a = 2 alpha / (B h w D)
    expected = torch.zeros(64, 8, dtype=torch.float64).index_add_(0, indices, upstream.flatten(1).double())
    assert relative_error(codes_paper - codes_standard, share * expected) < 1e-5


@pytest.mark.parametrize("sparse_fraction", [0.0, 1.0], ids=["dense-path", "sparse-path"])
def test_routing_rule_gradients_match_dense_reference(monkeypatch, sparse_fraction):
    monkeypatch.setattr(nsvq, "SPARSE_PAIR_FRACTION", sparse_fraction)
    z, codes = clustered_problem(seed=1)
    n, dim = z.shape
    tau, kernel_scale, alpha, beta = CLUSTERED_TAU, 0.1, 0.7, 0.25
    upstream = torch.randn(n, dim, 1, 1, generator=torch.Generator().manual_seed(9))
    q = quantizer(codes, tau=tau, tau_schedule="constant", kernel_scale=kernel_scale, alpha=alpha, beta=beta,
                  rule="routing", straight_through="paper")
    latents = as_image(z).requires_grad_()
    out = q(latents)
    assert torch.equal(out.quantized, q.embed(out.indices))
    (out.loss + (out.quantized * upstream).sum()).backward()

    # Plain vq embedding loss (weighted by alpha), paper straight-through, and W_soft^T G to the neighbours.
    soft, nearest = reference_weights(z, codes, tau, kernel_scale, winner=0.0)
    squared_error = (codes.double()[nearest] - z.double()).pow(2).mean()
    assert out.loss.item() == pytest.approx(((alpha + beta) * squared_error).item(), rel=1e-6)
    c64 = codes.double().requires_grad_()
    q64 = c64[nearest]
    g = upstream.flatten(1).double()
    loss = alpha * (q64 - z.double()).pow(2).mean() + (2 * alpha / (n * dim)) * (q64 * g).sum()
    (expected,) = torch.autograd.grad(loss, c64)
    expected = expected + soft.t() @ g
    assert float((soft.t() @ g).norm()) > 0.1 * float(expected.norm())  # the routed part matters here
    assert relative_error(q.codebook.grad, expected) < CLUSTERED_TOLERANCE
    # The encoder: the decoder gradient straight through, plus the commitment term's.
    commitment = 2 * beta * (z.double() - codes.double()[nearest]) / (n * dim)
    assert relative_error(latents.grad.flatten(1), g + commitment) < 1e-6


def test_bf16_autocast_keeps_indices_and_loss():
    z, codes = random_problem(256, 300, 16, seed=10)
    for rule in ("dense", "routing"):
        q = quantizer(codes, tau=0.5, tau_schedule="constant", rule=rule)
        reference = q(as_image(z))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = q(as_image(z))
        assert torch.equal(mixed.indices, reference.indices)
        assert mixed.loss.dtype == torch.float32
        assert mixed.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)


def test_relative_tau_is_scale_free():
    """tau_mode="relative" multiplies tau by the running mean winner distance: scaling latents and codes by
    4 leaves every weight unchanged, so the loss scales by 16 and the code gradient by 4."""
    z, codes = random_problem(128, 200, 8, seed=11)
    results = []
    for scale in (1.0, 4.0):
        q = quantizer(codes * scale, tau=0.5, tau_schedule="constant", tau_mode="relative", kernel_scale=0.1)
        assert math.isnan(q.current_tau)
        out = q(as_image(z * scale))
        out.loss.backward()
        results.append((out.loss.item(), q.codebook.grad.double(), q.current_tau))
    (loss_1, grad_1, tau_1), (loss_4, grad_4, tau_4) = results
    assert loss_4 == pytest.approx(16 * loss_1, rel=1e-5)
    assert relative_error(grad_4 / 4, grad_1) < 1e-5
    assert tau_4 == pytest.approx(16 * tau_1, rel=1e-5)
    # The first batch sets the running mean to its own winners' mean squared distance.
    nearest = reference_weights(z, codes, 1.0, 0.1, winner=1.0)[1]
    mean_distance = (z.double() - codes.double()[nearest]).pow(2).sum(1).mean().item()
    assert tau_1 == pytest.approx(0.5 * mean_distance, rel=1e-5)


def test_relative_tau_updates_only_in_training():
    z, codes = random_problem(64, 50, 8, seed=12)
    q = quantizer(codes, tau=1.0, tau_schedule="constant", tau_mode="relative", distance_ema_decay=0.5).eval()
    q(as_image(z))
    assert math.isnan(q.current_tau)
    q.train()
    q(as_image(z))
    first = q.current_tau
    q(as_image(2 * z))
    nearest = reference_weights(2 * z, codes, 1.0, 0.1, winner=1.0)[1]
    second_batch = (2 * z.double() - codes.double()[nearest]).pow(2).sum(1).mean().item()
    assert q.current_tau == pytest.approx(0.5 * first + 0.5 * second_batch, rel=1e-5)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": math.nan}, "tau"),
        ({"tau": math.inf}, "tau"),
        ({"tau_schedule": "linear"}, "tau_schedule"),
        ({"tau_schedule": "exp", "gamma": 0.1}, "bad option"),
        ({"tau_schedule": "cosine", "tau_min": 0.0}, "tau_min"),
        ({"tau_schedule": "step", "step_size": 0}, "step_size"),
        ({"straight_through": "new"}, "straight_through"),
        ({"rule": "soft"}, "rule"),
        ({"tau_mode": "adaptive"}, "tau_mode"),
        ({"kernel_scale": -0.1}, "kernel_scale"),
        ({"alpha": math.nan}, "alpha"),
        ({"distance_ema_decay": 1.0}, "distance_ema_decay"),
        ({"chunk_elements": 0}, "chunk_elements"),
    ],
)
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer("nsvq", codebook_size=16, dim=4, **options)


def test_negative_step_raises_value_error():
    q = build_quantizer("nsvq", codebook_size=16, dim=4)
    with pytest.raises(ValueError, match="step"):
        q.set_step(-1)


def test_grouped_argmin_is_the_first_occurrence_argmin():
    """The shared argmin NS-VQ reuses (base.grouped_argmin through nearest_codes): ties across and inside
    code groups, and codebooks padded to a multiple of 64 codes."""
    from stage1_tokenizer.quantizers.base import nearest_codes

    g = torch.Generator().manual_seed(13)
    for num_codes in (2, 64, 100, 300):
        codes = torch.randint(-2, 3, (num_codes, 3), generator=g).float()  # many exact duplicates
        z = torch.randint(-2, 3, (500, 3), generator=g).float()
        expected = (codes.pow(2).sum(1) - 2 * z @ codes.t()).argmin(1)
        assert torch.equal(nearest_codes(z, codes, chunk_elements=1), expected)
