"""Factorized-code quantizer (ViT-VQGAN, Yu et al., arXiv 2110.04627, Sec. 3.2; "VQGAN-FC" in the paper's
tables): look codes up in a low-dimensional, l2-normalised space, then project back up.

    e   = normalize(W_down z + b_down)                      [N, code_dim], unit vectors
    c_k = normalize(codes_k)                                [K, code_dim], unit vectors
    q   = argmin_k ||e - c_k||^2 = argmax_k cos(e, c_k)     (equal on unit vectors)
    L   = ||sg(e) - c_q||^2 + beta ||e - sg(c_q)||^2        in the low-dimensional space
    out = W_up (e + sg(c_q - e)) + b_up                     straight-through before the up-projection

Both the low dimension and the normalisation spread the codes over a sphere where every code stays in
reach of the latents, which is how ViT-VQGAN raises codebook usage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput, commitment_and_codebook_loss, nearest_codes, straight_through


class FactorizedQuantizer(Quantizer):
    """Low-dimensional, l2-normalised code lookup between two linear projections.

    ``.codebook`` is the effective ``[K, D]`` table ``W_up normalize(codes) + b_up``, so ``embed(indices)``
    equals the forward value.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25).
        code_dim: dimension of the lookup space, much lower than D (ViT-VQGAN, Sec. 3.2); 8 by default.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, code_dim: int = 8):
        super().__init__(codebook_size, dim, beta)
        if not isinstance(code_dim, int) or code_dim < 1:
            raise ValueError(f"code_dim (lookup dimension) must be a positive integer, e.g. 8; got {code_dim!r}")
        self.code_dim = code_dim
        self.project_down = nn.Linear(dim, code_dim)
        self.project_up = nn.Linear(code_dim, dim)
        # Only the direction of a code matters (it is normalised before use), so any isotropic start will do.
        self.codes = nn.Embedding(codebook_size, code_dim)

    @property
    def codebook(self) -> Tensor:
        with torch.autocast(device_type=self.codes.weight.device.type, enabled=False):
            return self.project_up(F.normalize(self.codes.weight, dim=1))

    def forward(self, z: Tensor) -> QuantizerOutput:
        flat = self.flatten(z)
        # The projections are part of the lookup: run them in float32 too, or a bf16 down-projection would
        # move the latents enough to flip the argmin between close codes.
        with torch.autocast(device_type=flat.device.type, enabled=False):
            latents = F.normalize(self.project_down(flat.float()), dim=1)
            codes = F.normalize(self.codes.weight, dim=1)
            indices = nearest_codes(latents, codes)
            chosen = F.embedding(indices, codes)
            loss = commitment_and_codebook_loss(latents, chosen, self.beta)
            quantized = self.project_up(straight_through(latents, chosen)).to(flat.dtype)
        return self.output(z, quantized, indices, loss)
