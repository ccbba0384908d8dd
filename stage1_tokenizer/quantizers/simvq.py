"""SimVQ (Zhu et al., arXiv 2411.02038): a frozen random codebook behind one trainable linear map.

    C = C0 W^T (+ b)        C0 in R^{K x D} frozen, entries N(0, 1/D); only W (and b) learn
    L = ||sg(z) - c_q||^2 + beta ||z - sg(c_q)||^2,  straight-through

Every code is a function of the shared W, so every step moves every code, selected or not: the cure for
codes that win nothing and therefore never get a gradient, which is the collapse the paper analyses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput


class SimVQ(Quantizer):
    """Nearest-code lookup in ``C = C0 W^T (+ b)`` with a frozen Gaussian ``C0``.

    ``C0`` is a buffer in the state dict, so a checkpoint reproduces the codebook exactly. In eval mode the
    codebook is computed once and reused (detached) until W, b or C0 change, in place (an optimizer step,
    ``load_state_dict``) or by a move to another device or dtype.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25).
        bias: also learn an offset b, one shift shared by every code (off by default).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, bias: bool = False):
        super().__init__(codebook_size, dim, beta)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) / math.sqrt(dim))
        self.projection = nn.Linear(dim, dim, bias=bias)
        self._eval_codebook: Tensor | None = None
        self._eval_codebook_key: tuple | None = None

    def _compute_codebook(self) -> Tensor:
        # float32 under autocast as well: a bf16 codebook would move the codes by ~0.4% and flip the argmin
        # between close codes.
        with torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            return self.projection(self.frozen_codebook)

    def _source_key(self) -> tuple:
        """Identifies the current values of C0, W and b: storage address (changes on .to()) and version
        counter (bumped by every in-place write)."""
        sources = [self.frozen_codebook, *self.projection.parameters()]
        return tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in sources)

    @property
    def codebook(self) -> Tensor:
        if self.training:
            return self._compute_codebook()
        key = self._source_key()
        if self._eval_codebook_key != key:
            with torch.no_grad():
                self._eval_codebook = self._compute_codebook()
            self._eval_codebook_key = key
        return self._eval_codebook

    def export_codebook(self) -> Tensor:
        """The current codebook as a plain ``[K, D]`` table: detached, a copy, no graph.

        Returns:
            ``[K, D]`` tensor; a plain vq table holding it quantizes identically, at vq's inference cost.
        """
        with torch.no_grad():
            return self._compute_codebook().clone()

    def forward(self, z: Tensor) -> QuantizerOutput:
        return self.quantize_with_table(z, self.codebook)
