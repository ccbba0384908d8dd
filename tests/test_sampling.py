"""sample_grids: shapes, validity, reproducibility, KV cache == no cache, guidance, and argument checks."""

import pytest
import torch
from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

from stage2_prior import build_prior, sample_grids

K = 32


def tiny_prior(num_classes=0, grid_size=(4, 4), codebook_size=K, seed=0):
    """A random prior whose logits are spread out (std ~1), so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    prior = build_prior(codebook_size, grid_size, num_classes, hidden_size=32, num_layers=2, num_heads=2)
    with torch.no_grad():
        prior.lm_head.weight.normal_(0, 1.0 / 32**0.5)
    return prior.eval()


def masked_logits(prior, ids):
    logits = prior(ids).logits[:, -1].float()
    logits[:, prior.codebook_size :] = float("-inf")
    return logits


@torch.no_grad()
def greedy_reference(prior, class_labels=None, guidance_scale=1.0, batch_size=3):
    """Slow and obviously right: re-run the whole sequence every step, combine cond/uncond by hand."""
    ids = prior.conditioning_tokens(class_labels, batch_size)
    for _ in range(prior.num_grid_tokens):
        logits = prior(ids).logits[:, -1].float()
        if guidance_scale != 1:
            null_ids = ids.clone()
            null_ids[:, 0] = prior.null_token_id
            uncond = prior(null_ids).logits[:, -1].float()
            logits = uncond + guidance_scale * (logits - uncond)
        logits[:, prior.codebook_size :] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    h, w = prior.grid_size
    return ids[:, 1:].reshape(batch_size, h, w)


def test_shapes_dtype_and_range():
    prior = tiny_prior(grid_size=(3, 5))
    grids = sample_grids(prior, batch_size=6, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (6, 3, 5) and grids.dtype == torch.long
    assert int(grids.min()) >= 0 and int(grids.max()) < K


def test_special_tokens_are_never_generated():
    # Make the class and null tokens overwhelmingly likely; the suppressing processor must still keep them out.
    prior = tiny_prior(num_classes=3)
    with torch.no_grad():
        prior.lm_head.weight.zero_()
    prior.lm_head.register_forward_hook(lambda m, i, out: out + torch.cat([torch.zeros(K), torch.full((4,), 100.0)]))
    grids = sample_grids(prior, batch_size=4, generator=0, class_labels=1)
    assert int(grids.max()) < K


def test_same_seed_same_grids_different_seed_different_grids():
    prior = tiny_prior()
    a = sample_grids(prior, 4, generator=torch.Generator().manual_seed(7))
    b = sample_grids(prior, 4, generator=torch.Generator().manual_seed(7))
    c = sample_grids(prior, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(sample_grids(prior, 4, generator=7), sample_grids(prior, 4, generator=7))


def test_generator_leaves_global_rng_alone_and_advances():
    prior = tiny_prior()
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(3)
    first = sample_grids(prior, 4, generator=gen)
    second = sample_grids(prior, 4, generator=gen)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("num_classes, labels, scale", [(0, None, 1.0), (3, [0, 2, 1], 1.0), (3, [0, 2, 1], 2.5)])
def test_greedy_matches_slow_reference_with_and_without_kv_cache(num_classes, labels, scale):
    prior = tiny_prior(num_classes=num_classes)
    expected = greedy_reference(prior, torch.tensor(labels) if labels else None, scale)
    for use_cache in (True, False):
        got = sample_grids(prior, 3, temperature=0, class_labels=labels, guidance_scale=scale, use_cache=use_cache)
        assert torch.equal(got, expected), f"use_cache={use_cache}"


@pytest.mark.parametrize("num_classes, labels, scale", [(0, None, 1.0), (3, 2, 3.0)])
def test_sampling_with_kv_cache_equals_sampling_without(num_classes, labels, scale):
    prior = tiny_prior(num_classes=num_classes)
    kwargs = dict(batch_size=4, temperature=0.9, top_p=0.95, class_labels=labels, guidance_scale=scale)
    cached = sample_grids(prior, generator=11, use_cache=True, **kwargs)
    uncached = sample_grids(prior, generator=11, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_top_k_one_equals_greedy():
    prior = tiny_prior()
    assert torch.equal(sample_grids(prior, 3, generator=5, top_k=1), sample_grids(prior, 3, temperature=0))


def test_top_k_none_means_no_filter():
    # generate() fills an unset top_k with 50; None must mean "all codes". Nearly uniform logits over 256
    # codes, in a fixed order (a tiny ramp, so a top-50 filter has no ties to keep): 256 draws hit about 162
    # distinct codes, at most 50 under a silent top-50 filter.
    prior = tiny_prior(codebook_size=256, grid_size=(16, 16))
    with torch.no_grad():
        prior.lm_head.weight.zero_()
    prior.lm_head.register_forward_hook(lambda m, i, out: out + torch.linspace(0, 0.01, out.shape[-1]))
    grids = sample_grids(prior, 1, generator=0)
    assert grids.unique().numel() > 100


def test_first_code_follows_temperature_scaled_softmax():
    prior = tiny_prior(codebook_size=8, grid_size=(1, 1))
    n = 4000
    grids = sample_grids(prior, n, generator=0, temperature=0.5)
    with torch.no_grad():
        probs = torch.softmax(masked_logits(prior, prior.conditioning_tokens(None, 1)) / 0.5, -1)[0, :8]
    freq = torch.bincount(grids.reshape(-1), minlength=8).float() / n
    assert (freq - probs).abs().sum() < 0.06, (freq, probs)


def test_guidance_processor_math_on_hand_built_scores():
    processor = ClassifierFreeGuidanceLogitsProcessor(3.0)
    cond = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    uncond = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 4.0]])
    out = processor(torch.zeros(2, 1, dtype=torch.long), torch.cat([cond, uncond]))
    expected = torch.tensor([[3.0, 4.0, -2.0], [-2.0, 0.0, 7.0]])  # uncond + 3 * (cond - uncond)
    torch.testing.assert_close(out, expected)


def test_guidance_changes_samples_and_class_labels_broadcast():
    prior = tiny_prior(num_classes=3)
    plain = sample_grids(prior, 4, temperature=0, class_labels=1)
    guided = sample_grids(prior, 4, temperature=0, class_labels=1, guidance_scale=4.0)
    assert torch.equal(plain, sample_grids(prior, 4, temperature=0, class_labels=[1, 1, 1, 1]))
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize(
    "num_classes, kwargs, message",
    [
        (0, {"top_p": 0.0}, "top_p"),
        (0, {"top_p": 1.5}, "top_p"),
        (0, {"temperature": -1.0}, "temperature"),
        (0, {"temperature": float("nan")}, "temperature"),
        (0, {"top_k": 0}, "top_k"),
        (0, {"batch_size": 0}, "batch_size"),
        (0, {"class_labels": [0]}, "unconditional"),
        (0, {"guidance_scale": 2.0}, "conditional"),
        (3, {"class_labels": [3]}, r"\[0, 3\)"),
        (3, {"class_labels": [-1]}, r"\[0, 3\)"),
        (3, {"class_labels": [0, 1]}, "one per row"),
        (3, {"guidance_scale": 2.0}, "class_labels"),
        (3, {"guidance_scale": 0.5, "class_labels": 0}, "guidance_scale"),
        (0, {"generator": "seed"}, "generator"),
    ],
)
def test_invalid_requests_raise_value_error(num_classes, kwargs, message):
    prior = tiny_prior(num_classes=num_classes)
    args = {"batch_size": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample_grids(prior, **args)
