"""Sampling token grids from an :class:`~stage2_prior.prior.ImageTokenPrior` through transformers' ``generate``.

Everything the sampler needs is transformers' own machinery: the KV cache, multinomial sampling, the
temperature / top-k / top-p warpers, ``SuppressTokensLogitsProcessor`` (so class and null tokens are never
generated and every generated id is a valid code) and ``ClassifierFreeGuidanceLogitsProcessor`` (which
combines the ``2 B`` logit rows the prior produces under guidance into ``B``:
``uncond + scale * (cond - uncond)``). What is ours: argument checks, the conditioning tokens, and the
random-number discipline below.

Determinism: ``generate`` draws from the global torch RNG and takes no generator. When ``generator`` is
given, we draw one 63-bit seed from it, fork the global RNG (CPU, and the prior's CUDA device), seed it with
that seed for the duration of ``generate``, and restore it afterwards. So the same generator state gives the
same grids, the caller's global RNG is untouched, and the generator advances by one draw per call (two calls
with one generator give different grids, as in diffusers pipelines).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from .prior import ImageTokenPrior


def check_sampling_options(
    prior: ImageTokenPrior,
    batch_size: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    guidance_scale: float,
    class_labels,
) -> Tensor | None:
    """Raise ValueError on an invalid request; return the class labels as ``long [B]`` (or None)."""
    if not isinstance(prior, ImageTokenPrior):
        raise ValueError(
            f"prior must be an ImageTokenPrior (stage2_prior.build_prior or ImageTokenPrior.from_pretrained), "
            f"got {type(prior).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy decoding), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (no top-k filtering), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] or be None (no nucleus filtering), got {top_p!r}")
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 1):
        raise ValueError(
            f"guidance_scale must be a finite number >= 1 (1 = no guidance), got {guidance_scale!r}; for samples "
            "of the unconditional model inside a conditional prior pass class_labels=None"
        )
    if prior.num_classes == 0:
        if class_labels is not None:
            raise ValueError("this prior is unconditional (num_classes=0); pass class_labels=None")
        if guidance_scale != 1:
            raise ValueError("classifier-free guidance needs a class-conditional prior; use guidance_scale=1")
        return None
    if class_labels is None:
        if guidance_scale != 1:
            raise ValueError("guidance_scale != 1 needs class_labels (guidance pushes samples toward a class)")
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(
            f"got {labels.numel()} class labels for batch_size={batch_size}; pass one label or one per row"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= prior.num_classes:
        raise ValueError(
            f"class labels must lie in [0, {prior.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator | int | None, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG seeded from ``generator``; restore the global RNG afterwards.

    ``None`` leaves the global RNG alone (the block draws from it as usual).
    """
    if generator is None:
        yield
        return
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
    elif isinstance(generator, int) and not isinstance(generator, bool):
        seed = generator
    else:
        raise ValueError(
            f"generator must be a torch.Generator, an integer seed or None, got {type(generator).__name__}"
        )
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_grids(
    prior: ImageTokenPrior,
    batch_size: int = 8,
    generator: torch.Generator | int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    class_labels: int | Sequence[int] | Tensor | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sample token grids, conditioning token first, codes in raster order.

    Args:
        prior: the autoregressive prior.
        batch_size: B, number of grids.
        generator: a ``torch.Generator`` or an integer seed for reproducible samples; None uses the global RNG.
        temperature: softmax temperature; 0 means greedy decoding (argmax; top_k and top_p are then unused).
        top_k: keep only the k most likely codes at each step; None keeps all.
        top_p: nucleus sampling, keep the smallest set of codes whose probability reaches top_p; None keeps all.
        guidance_scale: classifier-free guidance scale s >= 1; logits ``uncond + s * (cond - uncond)``.
            1 turns guidance off. Needs a conditional prior and class_labels.
        class_labels: one class id for the whole batch, or ``B`` ids; None for an unconditional prior (or for
            samples of the null-class model of a conditional one).
        use_cache: reuse attention keys and values between steps (the KV cache). Off, every step re-runs the
            whole prefix; the result is the same, only slower.

    Returns:
        ``long [B, h, w]`` code grids, every entry in ``[0, codebook_size)``.
    """
    labels = check_sampling_options(prior, batch_size, temperature, top_k, top_p, guidance_scale, class_labels)
    prompt = prior.conditioning_tokens(labels, batch_size)
    guided = guidance_scale != 1

    processors = LogitsProcessorList()
    if guided:
        # First, while the scores still have 2B rows; the warpers (temperature, top-k, top-p) that generate()
        # appends after our processors then act on the guided distribution.
        processors.append(ClassifierFreeGuidanceLogitsProcessor(guidance_scale))
    # After guidance: suppressing (-inf) before it would give -inf - (-inf) = NaN in cond - uncond.
    processors.append(SuppressTokensLogitsProcessor(prior.special_token_ids, device=prompt.device))

    greedy = temperature == 0
    config = GenerationConfig(
        max_new_tokens=prior.num_grid_tokens,
        min_new_tokens=prior.num_grid_tokens,
        do_sample=not greedy,
        temperature=None if greedy else float(temperature),
        # generate() fills an unset top_k with 50; 0 disables the filter explicitly.
        top_k=None if greedy else (top_k or 0),
        top_p=None if greedy else (1.0 if top_p is None else float(top_p)),
        use_cache=use_cache,
        bos_token_id=prior.null_token_id,
        pad_token_id=prior.null_token_id,
        eos_token_id=None,
    )
    with seeded_global_rng(generator, prompt.device):
        sequences = prior.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=config,
            logits_processor=processors,
            classifier_free_guidance=guided,
        )
    h, w = prior.grid_size
    return sequences[:, prompt.shape[1] :].reshape(batch_size, h, w)
