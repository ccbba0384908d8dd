"""VQARPipeline: sample token grids with the autoregressive prior, decode them with the VQ tokenizer."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from transformers import PreTrainedModel

from stage1_tokenizer import VQTokenizer
from stage2_prior import sample_grids

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")


class VQARPipeline(DiffusionPipeline):
    """Two-stage generator: ``prior`` (a transformers causal LM over raster-order token grids) samples
    codes, ``tokenizer`` (a :class:`~stage1_tokenizer.VQTokenizer`) decodes them to images.

    Args:
        tokenizer: the stage-one image tokenizer; its codebook size must equal the prior's.
        prior: the stage-two causal LM built by :func:`stage2_prior.build_prior`.
    """

    model_cpu_offload_seq = "prior->tokenizer"

    def __init__(self, tokenizer: VQTokenizer, prior: PreTrainedModel):
        super().__init__()
        prior_k = getattr(prior.config, "codebook_size", None)
        if prior_k is not None and prior_k != tokenizer.config.codebook_size:
            raise ValueError(
                f"the prior models {prior_k} codes but the tokenizer has {tokenizer.config.codebook_size}; "
                "train the prior on token grids of this tokenizer (scripts/tokenize_dataset.py)"
            )
        self.register_modules(tokenizer=tokenizer, prior=prior)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        class_labels: list[int] | torch.Tensor | None = None,
        output_type: str = "pil",
        decode_batch_size: int = 16,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: number of images.
            generator: a ``torch.Generator`` for reproducible samples.
            temperature, top_k, top_p: sampling controls passed to the prior's ``generate``.
            guidance_scale: classifier-free guidance scale (conditional priors only; 1.0 = off).
            class_labels: one label per image for a conditional prior.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float array ``[B, H, W, 3]`` in [0, 1]),
                ``"pt"`` (tensor ``[B, 3, H, W]`` in [0, 1]) or ``"tokens"`` (the long ``[B, h, w]`` grids).
            decode_batch_size: images decoded at once (bounds decoder memory).
            return_dict: return an ``ImagePipelineOutput`` (else a one-element tuple).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        grids = sample_grids(
            self.prior,
            batch_size=batch_size,
            generator=generator,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            guidance_scale=guidance_scale,
            class_labels=class_labels,
        )
        if output_type == "tokens":
            return ImagePipelineOutput(images=grids) if return_dict else (grids,)

        device = next(self.tokenizer.parameters()).device
        chunks = []
        for start in self.progress_bar(range(0, grids.shape[0], decode_batch_size)):
            images = self.tokenizer.decode(grids[start : start + decode_batch_size].to(device))
            chunks.append(((images.float().clamp(-1, 1) + 1) / 2).cpu())
        images = torch.cat(chunks)
        if output_type == "np" or output_type == "pil":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(np.ascontiguousarray(images))
        return ImagePipelineOutput(images=images) if return_dict else (images,)
