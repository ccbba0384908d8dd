"""The pipeline that samples token grids with the prior and decodes them with the tokenizer.

Importing this package imports both stages: diffusers' ``from_pretrained`` refuses to import a
component's library that the process has not imported yet (diffusers 0.42), so ``import pipelines``
is what makes ``VQARPipeline.from_pretrained(folder)`` work in a fresh process.
"""

import stage1_tokenizer  # noqa: F401  (registers the tokenizer's module for diffusers' loader)
import stage2_prior  # noqa: F401

from .pipeline_vqar import VQARPipeline

__all__ = ["VQARPipeline"]
