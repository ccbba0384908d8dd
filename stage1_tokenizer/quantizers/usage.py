"""Codebook usage over many batches: the paper's utilisation metric (fraction of codes used at least once
over an epoch) and the perplexity of the accumulated code histogram.

A single batch says little: with 16 x 16 tokens and a batch of 16 there are 4,096 latents, so a K = 8,192
book cannot be fully used by one batch even when nothing has collapsed. Hence a tracker that accumulates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class CodebookUsage:
    """Accumulates code-hit counts across batches (and, after :meth:`sync`, across processes).

    Counts since the last :meth:`sync` are kept apart from the merged ones, so ``sync`` may be called any
    number of times (collectively, by every process) without counting a hit twice.

    Args:
        codebook_size: K, number of codes.

    Example:
        >>> usage = CodebookUsage(1024)
        >>> for batch in loader:
        ...     usage.update(tokenizer(batch).indices)
        >>> usage.sync()              # every process; a no-op without torch.distributed
        >>> usage.summary()["utilisation"]
    """

    def __init__(self, codebook_size: int):
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size must be an integer >= 2, got {codebook_size!r}")
        self.codebook_size = codebook_size
        self._merged = torch.zeros(codebook_size, dtype=torch.long)
        self._unsynced = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: Tensor) -> None:
        """Add the code hits of one batch.

        Args:
            indices: integer tensor of any shape (e.g. ``[B, H, W]``) with values in ``[0, K)``.
        """
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]; is the tracker's codebook_size the quantizer's?"
            )
        # The counters follow the indices' device: no per-step copy of the histogram between devices.
        if self._unsynced.device != indices.device:
            self._merged = self._merged.to(indices.device)
            self._unsynced = self._unsynced.to(indices.device)
        self._unsynced += torch.bincount(indices.reshape(-1).long(), minlength=self.codebook_size)

    def reset(self) -> None:
        """Forget every hit (start of a new epoch)."""
        self._merged.zero_()
        self._unsynced.zero_()

    def sync(self) -> None:
        """Merge the hits of all processes into every process's counts. A collective: under
        ``torch.distributed`` every process must call it; without it this is a no-op."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NCCL reduces only CUDA tensors; gloo takes CPU ones.
            on_cuda = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
            pending = self._unsynced.to(device)
            dist.all_reduce(pending)
            self._merged += pending.to(self._merged.device)
        else:
            self._merged += self._unsynced
        self._unsynced.zero_()

    @property
    def counts(self) -> Tensor:
        """``long [K]`` hits per code: merged ones plus this process's hits since the last sync."""
        return self._merged + self._unsynced

    def utilisation(self) -> float:
        """Fraction of codes hit at least once (0.0 before any update)."""
        return (self.counts > 0).sum().item() / self.codebook_size

    def dead_codes(self) -> int:
        """Number of codes never hit."""
        return int((self.counts == 0).sum())

    def perplexity(self) -> float:
        """``exp(entropy)`` of the accumulated histogram: K when use is uniform, 1 when one code takes all
        (and 1.0 before any update, as for an empty batch histogram)."""
        counts = self.counts.double()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum()
        return entropy.exp().item()

    def summary(self) -> dict[str, float | int]:
        """Everything worth logging, as plain numbers."""
        counts = self.counts
        return {
            "utilisation": self.utilisation(),
            "perplexity": self.perplexity(),
            "dead_codes": self.dead_codes(),
            "total_hits": int(counts.sum()),
            "codebook_size": self.codebook_size,
        }
