"""The baseline quantizers (vq, ema, fc, simvq) against slow, obviously-right float64 references, and the
codebook-usage tracker against hand-computed numbers (one process and two gloo processes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from stage1_tokenizer.quantizers import CodebookUsage, build_quantizer
from stage1_tokenizer.quantizers.ema import EMAQuantizer
from stage1_tokenizer.quantizers.fc import FactorizedQuantizer
from stage1_tokenizer.quantizers.simvq import SimVQ
from stage1_tokenizer.quantizers.vq import VectorQuantizer

BETA = 0.25


def channels_last(z: torch.Tensor) -> torch.Tensor:
    """``[B, D, H, W]`` -> ``[N, D]`` in the quantizers' latent order (b, h, w)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def brute_force_nearest(latents: torch.Tensor, codes: torch.Tensor) -> list[int]:
    """Nearest code of every latent by Python loops over float64 squared distances."""
    winners = []
    for latent in latents.double().tolist():
        distances = [sum((a - b) ** 2 for a, b in zip(latent, code)) for code in codes.double().tolist()]
        winners.append(min(range(len(distances)), key=distances.__getitem__))
    return winners


def vq_loss_reference(latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``||sg(z) - c_q||^2 + beta ||z - sg(c_q)||^2`` (means over latents and dims) in float64 autograd;
    ``codes`` may be any differentiable function of the parameters being checked."""
    chosen = codes[torch.tensor(brute_force_nearest(latents, codes))]
    return ((chosen - latents.detach()) ** 2).mean() + BETA * ((latents - chosen.detach()) ** 2).mean()


# ---------------------------------------------------------------------------------------------- vq
def test_vq_matches_a_float64_loop_reference():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=6, dim=3, beta=BETA)
    with torch.no_grad():
        q.embedding.weight.normal_()  # spread codes, so that several win
    z = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = q(z)
    out.loss.backward()

    latents, codes = channels_last(z).detach().double(), q.embedding.weight.detach().double()
    winners = brute_force_nearest(latents, codes)
    assert out.indices.flatten().tolist() == winners
    assert len(set(winners)) >= 3
    n, d = latents.shape
    squared_error = sum(float(((latents[i] - codes[k]) ** 2).sum()) for i, k in enumerate(winners))
    assert out.loss.item() == pytest.approx((1 + BETA) * squared_error / (n * d), rel=1e-6)
    # dL/dc_k = 2/(N D) sum_{i: q_i = k} (c_k - z_i): only the codebook term reaches the codes.
    code_grad = torch.zeros_like(codes)
    for i, k in enumerate(winners):
        code_grad[k] += 2 * (codes[k] - latents[i]) / (n * d)
    torch.testing.assert_close(q.embedding.weight.grad.double(), code_grad, rtol=1e-5, atol=1e-7)
    # dL/dz_i = 2 beta/(N D) (z_i - c_qi): only the commitment term reaches the latents.
    latent_grad = torch.stack([2 * BETA * (latents[i] - codes[k]) / (n * d) for i, k in enumerate(winners)])
    torch.testing.assert_close(channels_last(z.grad).double(), latent_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- fc
def test_fc_matches_a_float64_reference_of_its_formula():
    torch.manual_seed(0)
    q = FactorizedQuantizer(codebook_size=16, dim=6, beta=BETA, code_dim=3)
    z = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    out = q(z)
    out.loss.backward()

    w_down, b_down, w_up, b_up, raw_codes = (
        p.detach().double().requires_grad_()
        for p in (q.project_down.weight, q.project_down.bias, q.project_up.weight, q.project_up.bias, q.codes.weight)
    )
    projected = channels_last(z).double() @ w_down.t() + b_down
    unit_latents = projected / projected.norm(dim=1, keepdim=True)
    unit_codes = raw_codes / raw_codes.norm(dim=1, keepdim=True)
    winners = (unit_latents @ unit_codes.t()).argmax(1)  # highest cosine similarity
    assert torch.equal(out.indices.flatten(), winners)
    assert len(set(winners.tolist())) >= 3
    chosen = unit_codes[winners]
    loss = ((chosen - unit_latents.detach()) ** 2).mean() + BETA * ((unit_latents - chosen.detach()) ** 2).mean()
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(q.codes.weight.grad.double(), raw_codes.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(q.project_down.weight.grad.double(), w_down.grad, rtol=1e-4, atol=1e-7)
    # Forward value: the chosen unit code, projected back up; and that is what the [K, D] codebook holds.
    up = (chosen @ w_up.t() + b_up).detach()
    torch.testing.assert_close(channels_last(out.quantized).double(), up, rtol=0, atol=1e-5)
    torch.testing.assert_close(q.codebook.double(), (unit_codes @ w_up.t() + b_up).detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- simvq
@pytest.mark.parametrize("bias", [False, True])
def test_simvq_matches_a_float64_reference_of_its_formula(bias):
    torch.manual_seed(0)
    q = SimVQ(codebook_size=12, dim=4, beta=BETA, bias=bias)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = q(z)
    out.loss.backward()

    weight = q.projection.weight.detach().double().requires_grad_()
    codes = q.frozen_codebook.double() @ weight.t()
    if bias:
        offset = q.projection.bias.detach().double().requires_grad_()
        codes = codes + offset
    latents = channels_last(z).detach().double()
    winners = brute_force_nearest(latents, codes)
    assert out.indices.flatten().tolist() == winners
    assert len(set(winners)) >= 3
    loss = vq_loss_reference(latents, codes)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(q.projection.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-8)
    if bias:
        torch.testing.assert_close(q.projection.bias.grad.double(), offset.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(channels_last(out.quantized).double(), codes[winners].detach(), rtol=0, atol=1e-6)


def test_simvq_learns_only_the_projection_from_a_frozen_gaussian_base():
    q = SimVQ(codebook_size=4096, dim=16, bias=True)
    assert {name for name, _ in q.named_parameters()} == {"projection.weight", "projection.bias"}
    assert "frozen_codebook" in q.state_dict()
    assert q.frozen_codebook.mean().abs() < 0.01
    assert q.frozen_codebook.std().item() == pytest.approx(1 / math.sqrt(16), rel=0.03)


def test_simvq_eval_cache_is_reused_and_follows_parameter_changes():
    q = SimVQ(codebook_size=8, dim=4).eval()
    assert q.codebook is q.codebook  # computed once in eval
    assert q.train().codebook.grad_fn is not None  # and with its graph in training
    q.eval()
    cached = q.codebook
    # An optimizer step while in eval mode (an in-place write) must not leave a stale codebook behind.
    q.projection.weight.grad = torch.ones_like(q.projection.weight)
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    fresh = q.frozen_codebook @ q.projection.weight.detach().t()
    assert not torch.equal(q.codebook, cached)
    torch.testing.assert_close(q.codebook, fresh, rtol=0, atol=0)
    assert q.double().codebook.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- ema
CLUSTER_MEANS = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])


def four_clusters(steps: int, seed: int = 0, per_step: int = 256, std: float = 0.1):
    """Yields ``steps`` batches ``[1, 2, 16, 16]`` from a fixed mixture of 4 well-separated Gaussians."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = CLUSTER_MEANS[torch.randint(4, (per_step,), generator=g)]
        flat = picks + std * torch.randn(per_step, 2, generator=g)
        yield flat.reshape(1, 16, 16, 2).permute(0, 3, 1, 2)


def ema_with_codes(codes: torch.Tensor, **options) -> EMAQuantizer:
    """An EMA quantizer whose codes start at ``codes``, each as if it had been assigned one latent."""
    q = EMAQuantizer(codebook_size=codes.shape[0], dim=codes.shape[1], **options)
    q.load_state_dict({"embedding": codes, "cluster_size": torch.ones(codes.shape[0]), "embedding_sum": codes})
    return q.train()


def distance_to_nearest_mean(codes: torch.Tensor) -> torch.Tensor:
    return torch.cdist(codes, CLUSTER_MEANS).min(1).values


def test_ema_step_matches_the_update_formula():
    torch.manual_seed(0)
    decay, eps, k, d = 0.9, 1e-3, 5, 3
    codes = torch.randn(k, d)
    counts0 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    sums0 = codes * counts0[:, None]
    q = EMAQuantizer(codebook_size=k, dim=d, decay=decay, eps=eps).train()
    q.load_state_dict({"embedding": codes, "cluster_size": counts0, "embedding_sum": sums0})
    z = torch.randn(1, d, 4, 4, generator=torch.Generator().manual_seed(1))
    out = q(z)

    latents = channels_last(z).double()
    winners = brute_force_nearest(latents, codes)
    assert out.indices.flatten().tolist() == winners
    hits = torch.zeros(k, dtype=torch.float64)
    sums = torch.zeros(k, d, dtype=torch.float64)
    for i, w in enumerate(winners):
        hits[w] += 1
        sums[w] += latents[i]
    counts = decay * counts0.double() + (1 - decay) * hits
    ema_sums = decay * sums0.double() + (1 - decay) * sums
    total = counts.sum()
    smoothed = (counts + eps) / (total + k * eps) * total
    torch.testing.assert_close(q.cluster_size.double(), counts, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.embedding_sum.double(), ema_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.embedding.double(), ema_sums / smoothed[:, None], rtol=1e-5, atol=1e-6)
    # Commitment term only, against the updated codes (the forward value).
    chosen = q.embedding.double()[winners]
    assert out.loss.item() == pytest.approx(BETA * ((latents - chosen) ** 2).mean().item(), rel=1e-5)


def test_ema_codes_converge_to_the_cluster_means():
    q = ema_with_codes(CLUSTER_MEANS + torch.tensor([0.5, -0.4]))
    for z in four_clusters(steps=80):
        q(z)
    # Each code converged to its own cluster's mean: the start's weight is 0.99^80 against ~64 latents per
    # step, about 1%; the sampling noise is ~0.1 / sqrt(64 * 100).
    assert torch.cdist(q.codebook, CLUSTER_MEANS).diagonal().max() < 0.03


@pytest.mark.parametrize("threshold", [0.0, 0.8], ids=["no-restart", "restart"])
def test_ema_dead_codes_restart_only_when_asked(threshold):
    torch.manual_seed(0)
    far = torch.tensor([[50.0, 50.0], [60.0, -50.0], [-50.0, 70.0], [-60.0, -60.0]])
    q = ema_with_codes(torch.cat([CLUSTER_MEANS + 0.3, far]), dead_code_threshold=threshold)
    batches = four_clusters(steps=50)
    for z in (next(batches) for _ in range(10)):
        q(z)
    # Ten steps: the unused codes' counts (0.99^10 = 0.90) are still above the threshold: nobody restarts.
    # From step 23 on (0.99^23 < 0.8) they are below it.
    assert distance_to_nearest_mean(q.codebook[4:]).min() > 40
    for z in batches:
        q(z)
    if threshold:
        assert distance_to_nearest_mean(q.codebook).max() < 0.5
    else:
        assert distance_to_nearest_mean(q.codebook[4:]).min() > 40
        assert distance_to_nearest_mean(q.codebook[:4]).max() < 0.05


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("ema", {"decay": 1.0}, "decay"),
        ("ema", {"decay": 0.0}, "decay"),
        ("ema", {"decay": float("nan")}, "decay"),
        ("ema", {"eps": 0.0}, "eps"),
        ("ema", {"dead_code_threshold": -1.0}, "dead_code_threshold"),
        ("ema", {"beta": -0.1}, "beta"),
        ("fc", {"code_dim": 0}, "code_dim"),
        ("fc", {"code_dim": 2.5}, "code_dim"),
        ("simvq", {"bias": "yes"}, "bias"),
    ],
)
def test_bad_options_raise_value_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_quantizer(name, codebook_size=8, dim=4, **options)


# ---------------------------------------------------------------------------------------------- usage
def test_usage_counts_across_batches_against_hand_computed_values():
    usage = CodebookUsage(5)
    usage.update(torch.tensor([[0, 0], [1, 3]]))
    usage.update(torch.tensor([1], dtype=torch.int32))
    assert usage.counts.tolist() == [2, 2, 0, 1, 0]
    assert usage.utilisation() == pytest.approx(3 / 5)
    assert usage.dead_codes() == 2
    # p = (0.4, 0.4, 0, 0.2, 0)
    expected = math.exp(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)))
    assert usage.perplexity() == pytest.approx(expected, rel=1e-12)
    assert usage.perplexity() == pytest.approx(2.8717458, rel=1e-7)
    assert usage.summary() == {
        "utilisation": pytest.approx(0.6),
        "perplexity": pytest.approx(expected),
        "dead_codes": 2,
        "total_hits": 5,
        "codebook_size": 5,
    }
    usage.sync()  # no process group: merging changes nothing, however often
    usage.sync()
    assert usage.counts.tolist() == [2, 2, 0, 1, 0]

    usage.reset()
    assert usage.counts.tolist() == [0] * 5
    assert (usage.utilisation(), usage.dead_codes(), usage.perplexity()) == (0.0, 5, 1.0)
    usage.update(torch.arange(5).repeat(3))
    assert (usage.utilisation(), usage.dead_codes()) == (1.0, 0)
    assert usage.perplexity() == pytest.approx(5.0, rel=1e-12)


def test_usage_rejects_bad_input():
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookUsage(1)
    usage = CodebookUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        usage.update(torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------- two processes
WORLD_SIZE = 2
EMA_SHAPE = (2, 4, 3, 3)  # per process: B, D, H, W


def ema_batch(rank: int) -> torch.Tensor:
    return torch.randn(EMA_SHAPE, generator=torch.Generator().manual_seed(100 + rank))


def fresh_ema(dead_code_threshold: float = 0.0) -> EMAQuantizer:
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=6, dim=EMA_SHAPE[1], decay=0.5, dead_code_threshold=dead_code_threshold)
    with torch.no_grad():
        q.embedding.normal_()
        q.embedding_sum.copy_(q.embedding)
    return q.train()


def two_process_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        usage = CodebookUsage(5)
        usage.update(torch.tensor([[0, 0, 1]]) if rank == 0 else torch.tensor([1, 2]))
        usage.sync()
        usage.sync()  # nothing new to merge: must not count twice
        merged = usage.counts.clone()
        usage.update(torch.tensor([4]))  # a local hit after the merge, seen locally until the next sync
        local = usage.counts.clone()

        plain = fresh_ema()
        plain(ema_batch(rank))
        # Every code's count (1 at the start, decay 0.5) falls below 1e6: all of them restart every step.
        restarted = fresh_ema(dead_code_threshold=1e6)
        torch.manual_seed(rank)  # different random picks per process: only the broadcast can align them
        restarted(ema_batch(rank))
        save_file(
            {
                "merged": merged,
                "local": local,
                "plain": plain.codebook.contiguous(),
                "restarted": restarted.codebook.contiguous(),
                "world_size": torch.tensor(dist.get_world_size()),
            },
            f"{out_dir}/rank{rank}.safetensors",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    # Two spawned interpreters each import torch and the package: well over 5 s on a shared 2-core machine,
    # hence the tests that use this are marked slow.
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(two_process_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [load_file(str(folder / f"rank{rank}.safetensors")) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
def test_usage_sync_merges_counts_across_two_processes(two_process_results):
    for rank, result in enumerate(two_process_results):
        assert result["world_size"].item() == WORLD_SIZE
        assert result["merged"].tolist() == [2, 2, 1, 0, 0]
        assert result["local"].tolist() == [2, 2, 1, 0, 1]


@pytest.mark.slow
def test_ema_under_two_processes_updates_as_one_process_on_both_batches(two_process_results):
    reference = fresh_ema()
    reference(torch.cat([ema_batch(rank) for rank in range(WORLD_SIZE)]))
    for result in two_process_results:
        torch.testing.assert_close(result["plain"], reference.codebook, rtol=1e-6, atol=1e-6)
    # A single process's update differs: the all-reduce is what made them agree.
    alone = fresh_ema()
    alone(ema_batch(0))
    assert not torch.allclose(alone.codebook, reference.codebook, atol=1e-3)


@pytest.mark.slow
def test_ema_restarts_are_identical_across_processes_and_come_from_rank_zero(two_process_results):
    codebook0, codebook1 = (result["restarted"] for result in two_process_results)
    torch.testing.assert_close(codebook0, codebook1, rtol=0, atol=0)
    # Every restarted code is a latent of rank 0's batch.
    distances = torch.cdist(codebook0, channels_last(ema_batch(0)))
    assert distances.min(1).values.max() < 1e-6
