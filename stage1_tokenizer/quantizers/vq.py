"""VQ-VAE quantizer (van den Oord et al., arXiv 1711.00937): a learned table, nearest-code lookup,
straight-through gradients, codebook + commitment loss."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput


class VectorQuantizer(Quantizer):
    """Plain VQ: ``L = ||sg(z) - c_q||^2 + beta ||z - sg(c_q)||^2``.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25 in VQ-VAE and in the paper).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__(codebook_size, dim, beta)
        self.embedding = nn.Embedding(codebook_size, dim)
        # Uniform in +-1/K as in the VQ-VAE reference code: codes start near the origin, where a freshly
        # initialised encoder puts its latents.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        return self.quantize_with_table(z, self.codebook)
