"""EMA quantizer (VQ-VAE-2, Razavi et al., arXiv 1906.00446, appendix A of van den Oord et al. 1711.00937):
codes are exponential moving averages of the latents assigned to them, not learned by gradient descent.

Each training step, with ``n_k`` the number of latents that chose code ``k`` and ``s_k`` their sum:

    N_k <- decay N_k + (1 - decay) n_k                    EMA hit count
    S_k <- decay S_k + (1 - decay) s_k                    EMA sum of assigned latents
    c_k  = S_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)

The loss has the commitment term only, ``beta ||z - sg(c_q)||^2``; the codebook needs no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .base import Quantizer, QuantizerOutput, nearest_codes, straight_through


class EMAQuantizer(Quantizer):
    """VQ with an exponential-moving-average codebook and optional dead-code restart.

    Under ``torch.distributed`` the per-step hit counts and sums are all-reduced before the update and the
    restart latents are broadcast from rank 0, so every process keeps the same codebook.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25 in VQ-VAE-2).
        decay: EMA decay in (0, 1); 0.99 in VQ-VAE-2.
        eps: Laplace smoothing of the counts (> 0); keeps a code that wins nothing from dividing by zero.
        dead_code_threshold: a code whose EMA hit count falls below this is re-seeded from a random latent
            of the current batch (the common production fix for dead codes). 0 turns restarts off.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__(codebook_size, dim, beta)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie strictly between 0 and 1 (VQ-VAE-2 uses 0.99), got {decay!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps (Laplace smoothing) must be a finite number > 0, e.g. 1e-5; got {eps!r}")
        if not (dead_code_threshold >= 0 and math.isfinite(dead_code_threshold)):
            raise ValueError(
                f"dead_code_threshold must be a finite number >= 0 (0 disables restarts), got {dead_code_threshold!r}"
            )
        self.decay = float(decay)
        self.eps = float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        # Same start as vq (uniform in +-1/K, near where a fresh encoder puts its latents). Every code starts
        # as if one latent equal to itself had been assigned to it (count 1, sum = code): with a zero count
        # the first update would divide a code that won nothing by eps and send it far away.
        initial = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("embedding", initial)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", initial.clone())

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def forward(self, z: Tensor) -> QuantizerOutput:
        flat = self.flatten(z)
        indices = nearest_codes(flat, self.embedding)
        if self.training:
            self._update_codebook(flat, indices)
        # Looked up after the update (as VQ-VAE-2's reference code does), so the forward value is what
        # embed(indices) returns.
        q = F.embedding(indices, self.embedding)
        loss = self.beta * F.mse_loss(flat.float(), q)
        quantized = straight_through(flat, q.to(flat.dtype))
        return self.output(z, quantized, indices, loss)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor) -> None:
        with torch.autocast(device_type=flat.device.type, enabled=False):
            latents = flat.detach().float()
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            sums = torch.zeros_like(self.embedding_sum).index_add_(0, indices, latents)
            step_stats = torch.cat([counts[:, None], sums], dim=1)
            if _is_distributed():
                # One collective for both: every process must see the global counts and sums, or the
                # codebooks of the processes drift apart.
                dist.all_reduce(step_stats)
            self.cluster_size.lerp_(step_stats[:, 0], 1.0 - self.decay)
            self.embedding_sum.lerp_(step_stats[:, 1:], 1.0 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embedding.copy_(self.embedding_sum / smoothed[:, None])
            if self.dead_code_threshold > 0:
                self._restart_dead_codes(latents)

    def _restart_dead_codes(self, latents: Tensor) -> None:
        """Re-seed every code whose EMA count is under the threshold from a random latent of this batch.

        The restarted code gets the threshold as its count: it keeps its new place only if it wins at least
        that many latents in the next step, otherwise it is re-seeded again.
        """
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())  # identical on every process: the counts were all-reduced
        if num_dead == 0:
            return
        seeds = latents[torch.randint(latents.shape[0], (num_dead,), device=latents.device)]
        if _is_distributed():
            dist.broadcast(seeds, src=0)
        self.embedding[dead] = seeds
        self.embedding_sum[dead] = seeds * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
