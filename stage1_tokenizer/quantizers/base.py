"""The contract every quantizer shares, and the pieces of it that are the same for all of them.

A quantizer maps encoder output ``z`` of shape ``[B, D, H, W]`` to the nearest entries of a codebook of
``K`` codes. Every quantizer returns a :class:`QuantizerOutput`; every quantizer exposes its effective
``[K, D]`` codebook as ``.codebook`` (computed, for SimVQ and TransVQ), ``embed(indices)`` and
``set_step(step)``. Distances and the argmin always run in float32, also under bf16 autocast: a bf16
distance has ~3 significant digits, enough to flip the winner between two close codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elements (rows x K) of the N x K distance matrix processed at once: 4 MiB, 128 rows at K = 8192. The
# fastest setting measured for nearest_codes on this project's 2-core CPU (K = 1024 and 8192; 4x larger
# or smaller blocks cost 10-40% more), and a 65,536-code book never materialises an N x K matrix
# (N = 65,536 would be 16 GiB).
DEFAULT_CHUNK_ELEMENTS = 2**20
# The distance matmul slows down with fewer rows than this (measured at K = 65,536: 16 rows cost 12% more
# than 32), so a large codebook gets this many rows per chunk whatever the element budget says.
MIN_CHUNK_ROWS = 32
# Codes are scanned in contiguous groups of this many for the argmin (see grouped_argmin).
ARGMIN_GROUP = 64


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    Attributes:
        quantized: ``[B, D, H, W]``; its value is the chosen codes, its gradient reaches ``z`` straight through.
        indices: ``long [B, H, W]``, the chosen code of every latent.
        loss: scalar, every loss term of the quantizer with its weight.
        perplexity: scalar, ``exp(entropy)`` of this batch's code histogram.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor


class Quantizer(nn.Module):
    """Base class: argument checks, flattening, float32 nearest-code search, lookups, perplexity."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__()
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size must be an integer >= 2, got {codebook_size!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta (commitment weight) must be a finite number >= 0, got {beta!r}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = float(beta)

    # -- what subclasses provide -------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """The effective ``[K, D]`` codebook used for the argmin and the lookup."""
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """Advance step-dependent schedules (NS-VQ's tau). A no-op for quantizers without one."""

    # -- shared pieces -----------------------------------------------------------------------------
    def flatten(self, z: Tensor) -> Tensor:
        """Check ``z`` and return it as ``[N, D]`` (channels last), N = B * H * W."""
        if not isinstance(z, Tensor) or z.dim() != 4:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"expected latents of shape [B, D, H, W], got {shape}")
        if z.shape[1] != self.dim:
            raise ValueError(
                f"latent channel dimension {z.shape[1]} does not match the quantizer's dim={self.dim}; "
                "set the quantizer's dim to the encoder's output channels"
            )
        if not torch.isfinite(z).all():
            raise ValueError(
                "latents contain NaN or inf; the encoder diverged (lower the learning rate or enable "
                "gradient clipping) or the input images are corrupt"
            )
        return z.permute(0, 2, 3, 1).reshape(-1, self.dim)

    @staticmethod
    def unflatten(flat: Tensor, like: Tensor) -> Tensor:
        """``[N, D]`` back to the ``[B, D, H, W]`` layout of ``like``."""
        b, d, h, w = like.shape
        return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)

    def embed(self, indices: Tensor) -> Tensor:
        """Look codes up: ``long [B, H, W]`` -> ``[B, D, H, W]``."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        codes = F.embedding(indices.long(), self.codebook)
        return codes.permute(0, 3, 1, 2).contiguous()

    def output(self, z: Tensor, quantized: Tensor, indices: Tensor, loss: Tensor) -> QuantizerOutput:
        """Pack flat ``[N, D]`` quantized latents and ``[N]`` indices into the ``[B, D, H, W]`` contract."""
        return QuantizerOutput(
            quantized=self.unflatten(quantized, z),
            indices=indices.view(z.shape[0], z.shape[2], z.shape[3]),
            loss=loss,
            perplexity=self.perplexity(indices),
        )

    def quantize_with_table(self, z: Tensor, codebook: Tensor) -> QuantizerOutput:
        """Nearest code of ``codebook``, VQ-VAE loss, straight-through: the whole forward of every quantizer
        whose only difference is where its ``[K, D]`` table comes from (vq, simvq, transvq). ``codebook`` is
        passed in so that a computed one is computed once per forward."""
        flat = self.flatten(z)
        indices = nearest_codes(flat, codebook)
        q = F.embedding(indices, codebook)
        loss = commitment_and_codebook_loss(flat, q, self.beta)
        return self.output(z, straight_through(flat, q.to(flat.dtype)), indices, loss)

    def perplexity(self, indices: Tensor) -> Tensor:
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        return entropy.exp()


def search_codebook(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """The codebook laid out for :func:`grouped_argmin`: float32, padded with zero rows to a multiple of
    ``ARGMIN_GROUP``, and its squared norms with ``+inf`` on the padding, so a padded code never wins.

    Args:
        codebook: ``[K, D]``.

    Returns:
        ``[K_pad, D]`` codes and ``[K_pad]`` squared norms, ``K_pad = ARGMIN_GROUP * ceil(K / ARGMIN_GROUP)``.
    """
    codes = codebook.detach().float()
    sq_norms = codes.pow(2).sum(1)
    padding = -codes.shape[0] % ARGMIN_GROUP
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding, codes.shape[1])])
        sq_norms = torch.cat([sq_norms, sq_norms.new_full((padding,), math.inf)])
    return codes, sq_norms


def chunk_rows(num_latents: int, num_codes: int, chunk_elements: int) -> int:
    """Rows per chunk: ``chunk_elements // num_codes``, at least ``MIN_CHUNK_ROWS`` (and 1), at most N."""
    return max(1, min(num_latents, max(MIN_CHUNK_ROWS, chunk_elements // num_codes)))


def grouped_argmin(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row minima of ``scores`` and the first index where each is reached: ``scores.min(1)``, faster.

    torch's ``argmin`` over a row does not vectorise (measured on this project's 2-core AVX2 CPU: it costs
    half as much as the distance matmul itself at K = 8192); a min over each contiguous group of
    ``ARGMIN_GROUP`` columns does. So: group minima, the first group holding the row minimum, the first
    position of that minimum inside the group. Same index as ``argmin`` (first occurrence), a fifth of
    the cost.

    Args:
        scores: ``[rows, K_pad]`` float, ``K_pad`` a multiple of ``ARGMIN_GROUP``, last dimension contiguous.

    Returns:
        ``[rows]`` minima, ``long [rows]`` their first indices, ``[rows, K_pad / ARGMIN_GROUP]`` group minima.
    """
    rows, width = scores.shape
    groups = scores.unflatten(1, (width // ARGMIN_GROUP, ARGMIN_GROUP))
    group_minima = groups.amin(2)
    best_group = group_minima.argmin(1)
    # index_select on the flat [rows * groups, ARGMIN_GROUP] view: advanced indexing costs several times more.
    winning_groups = torch.arange(rows, device=scores.device) * groups.shape[1] + best_group
    inside = groups.flatten(0, 1).index_select(0, winning_groups).argmin(1)
    minima = group_minima.gather(1, best_group.unsqueeze(1)).squeeze(1)
    return minima, best_group * ARGMIN_GROUP + inside, group_minima


def nearest_codes(flat: Tensor, codebook: Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Index of the nearest code (squared Euclidean) for every row of ``flat``, in float32, in row chunks.

    ``||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2``; ``||z||^2`` is constant per row, so the argmin needs only
    ``||c||^2 - 2 z.c``, one fused ``addmm`` per chunk, written into one reused buffer.

    Args:
        flat: ``[N, D]`` latents.
        codebook: ``[K, D]``.
        chunk_elements: rows per chunk times K_pad, the size of the distance buffer.

    Returns:
        ``long [N]``.
    """
    with torch.autocast(device_type=flat.device.type, enabled=False), torch.no_grad():
        z = flat.detach().float()
        codes, sq_norms = search_codebook(codebook)
        rows = chunk_rows(z.shape[0], codes.shape[0], chunk_elements)
        buffer = z.new_empty(rows, codes.shape[0])
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            chunk = z[start : start + rows]
            scores = torch.addmm(sq_norms, chunk, codes.t(), beta=1.0, alpha=-2.0, out=buffer[: chunk.shape[0]])
            out[start : start + rows] = grouped_argmin(scores)[1]
        return out


def squared_distances(flat: Tensor, codebook: Tensor) -> Tensor:
    """Full ``[N, K]`` float32 squared distances (clamped at 0). For small problems and references."""
    with torch.autocast(device_type=flat.device.type, enabled=False):
        z = flat.float()
        c = codebook.float()
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ c.t() + c.pow(2).sum(1)
        return d.clamp_min(0)


def straight_through(z: Tensor, q: Tensor) -> Tensor:
    """Forward value ``q``, gradient to ``z`` unchanged (van den Oord et al. 2017)."""
    return z + (q - z).detach()


def commitment_and_codebook_loss(z: Tensor, q: Tensor, beta: float) -> Tensor:
    """VQ-VAE loss ``||sg(z) - q||^2 + beta ||z - sg(q)||^2``, means over latents and dims.

    beta sits on the commitment term (the encoder side). taming-transformers' "legacy" variant puts it on
    the codebook term instead; we do not.
    """
    z32, q32 = z.float(), q.float()
    return F.mse_loss(q32, z32.detach()) + beta * F.mse_loss(z32, q32.detach())
