"""NS-VQ, non-stationary VQ (Lu et al., arXiv 2602.18896; METHOD.md, "NS-VQ").

Plain VQ moves only the codes that win a latent; when the encoder's latents drift, the others stay behind
and never win again. NS-VQ pulls every code near a current latent toward it, with a kernel of the distance
``d_ik = ||z_i - c_k||^2`` (the form of the authors' code):

    p_ik  = softmax_k(-d_ik / tau)                         detached
    w_ik  = 1 if k = q_i else min(1, lambda K p_ik)        q_i = argmin_k d_ik, lambda = kernel_scale
    L_emb = (1/N) sum_i sum_k w_ik ||sg(z_i) - c_k||^2 / D
    L     = alpha L_emb + beta mean ||z_i - sg(c_qi)||^2

As tau -> 0 the kernel vanishes and NS-VQ is plain vq. tau follows a schedule of the training step
(``tau_schedule.py``).

How it is computed: no tensor of size N x K x D, and no N x K matrix either. With ``W_soft`` the weights
of the non-winners (winner's weight 0), the gradient on a code is
``(2 / (N D)) [sum_{i: q_i = k} (c_k - z_i) + s_k c_k - m_k]`` with ``s = W_soft^T 1``, ``m = W_soft^T Z``,
and ``N D L_emb = sum_i ||z_i - c_qi||^2 + sum_k (s_k ||c_k||^2 - 2 c_k.m_k + u_k)``, ``u = W_soft^T ||z||^2``.
One pass over chunks of rows of z computes the distances (float32, shared with the argmin, which equals
vq's), the weights, and ``W_soft^T [Z, 1, ||z||^2]`` with one matmul per chunk: memory O(rows * K), and the
backward pass is O(K D). The winners' terms are computed directly, without the expansion's cancellation.
The weights stay factored, ``W_soft = diag(g) X`` with ``g_i = lambda K / sum_k exp(-(d_ik - d_iq) / tau)``,
so the per-row scale lands on the small ``[rows, D + 2]`` operand instead of costing a pass over the block.

Exact sparsity. Kernel values at or below ``2^-126`` count as 0 (see ``DEAD_EXPONENT``). The argmin
already computes the minimum distance of every group of 64 codes; a group whose nearest code is that far
out in the kernel holds only zeros, and a chunk whose live (latent, group) pairs are few skips the dead
ones in the exponential and in the matmul. Nothing is approximated: the result is the dense result up to
summation order. Early in training (codes bunched near the origin) every weight is nonzero and the dense
path runs; once tau is small next to the spacing of the codes (tau decays), most groups are dead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    ARGMIN_GROUP,
    DEFAULT_CHUNK_ELEMENTS,
    Quantizer,
    QuantizerOutput,
    chunk_rows,
    grouped_argmin,
    nearest_codes,
    search_codebook,
    straight_through,
)
from .tau_schedule import build_tau_schedule

# Kernel values at or below 2^-126, float32's smallest normal number, count as 0 (the winner's value is 1):
# the flush-to-zero convention of GPU fast math. Denormals are negligible, and slow: torch's vectorised
# exp2 takes a microcode path for arguments below -126, 3.5x slower on this project's CPU, and most
# entries of a trained codebook's kernel lie there. With this convention a group of codes whose largest
# exponent is <= -126 holds exact zeros, and skipping it changes nothing.
DEAD_EXPONENT = -126.0
# 1 / tau is capped here (in log2 units): a tau so small that its inverse overflows float32 is the vq limit
# already (every distance gap above ~1e-36 underflows), and an inf would turn the winner's 0 gap into NaN.
MAX_INVERSE_TEMPERATURE = 1e38
# A chunk takes the sparse path when at most this fraction of its (row, code group) pairs is live: there
# the live groups are gathered, and only their live entries enter the sums (an index_add, no matmul).
# Measured (K = 1024 and 8192): the sparse path wins below ~50% live pairs, and loses 4x when all are live.
SPARSE_PAIR_FRACTION = 0.25

STRAIGHT_THROUGH = ("standard", "paper")
RULES = ("dense", "routing")
TAU_MODES = ("absolute", "relative")


def inverse_temperature(tau: float) -> float:
    """``log2(e) / tau``: the kernel is computed as ``exp2(-(d - d_min) * log2(e) / tau)``.

    exp2 costs ~40% less than exp in torch's vectorised CPU kernels (measured). A tau that has underflowed
    to 0 (a long exponential schedule) gives the cap, i.e. plain vq.
    """
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number >= 0 (0 is the plain vq limit), got {tau!r}")
    log2_e = 1.0 / math.log(2.0)
    return MAX_INVERSE_TEMPERATURE if tau * MAX_INVERSE_TEMPERATURE <= log2_e else log2_e / tau


def _kernel_weights_(exponents: Tensor, kernel_mass: float, owner: Tensor | None = None, rows: int = 0) -> Tensor:
    """Turn kernel exponents into the factored weights, in place: ``w = g * x`` with
    ``x = min(exp2(exponent), 1 / g)`` written over ``exponents`` and ``g`` (per latent) returned.

    Args:
        exponents: ``[rows, K_pad]`` (dense), or ``[E]`` live entries of ``rows`` latents (sparse);
            ``-(e - e_min) * inverse_temp``, so the winner's is 0.
        kernel_mass: ``lambda * K``.
        owner: ``long [E]``, the latent row of each live entry (sparse), or None (dense).
        rows: number of latents (sparse).

    Returns:
        ``[rows]`` row scales ``g = lambda K / sum_k exp(-(d_k - d_min) / tau)``.
    """
    kernel = exponents.exp2_()
    if owner is None:
        mass = kernel.sum(1)
    else:
        mass = kernel.new_zeros(rows).index_add_(0, owner, kernel)
    row_scale = kernel_mass / mass
    # w = min(1, g x) = g min(x, 1/g); x <= 1 everywhere, so only rows with g > 1 can clip.
    cap = row_scale.reciprocal()
    if bool((cap < 1).any()):
        kernel.clamp_max_(cap.unsqueeze(1) if owner is None else cap.index_select(0, owner))
    return row_scale


def kernel_code_sums(
    latents: Tensor,
    codebook: Tensor,
    values: Tensor,
    inverse_temp: float,
    kernel_mass: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """``W_soft^T values`` for NS-VQ's kernel weights (``N x K``, never stored whole), and the nearest codes.

    ``W_soft`` holds ``w_ik = min(1, kernel_mass * softmax_k(-d_ik / tau))`` for ``k != q_i`` and 0 for the
    winner: the routing rule's weights; the loss adds the winners' weight of 1 itself, exactly (see
    :class:`KernelEmbeddingLoss`). Float32 throughout; memory O(rows * K) for the block plus O(K * R).

    Args:
        latents: ``[N, D]`` float32.
        codebook: ``[K, D]`` float32.
        values: ``[N, R]`` float32, the right-hand side.
        inverse_temp: :func:`inverse_temperature` of tau.
        kernel_mass: ``lambda * K``.
        chunk_elements: rows per chunk times K_pad (see :func:`chunk_rows`).

    Returns:
        ``[K, R]`` float32 sums and ``long [N]`` nearest codes (identical to :func:`nearest_codes`).
    """
    n, width = latents.shape[0], values.shape[1]
    codes, sq_norms = search_codebook(codebook)
    padded = codes.shape[0]
    num_groups = padded // ARGMIN_GROUP
    rows = chunk_rows(n, padded, chunk_elements)
    buffer = latents.new_empty(rows, padded)
    # Transposed: the matmul then reads the kernel block row-major, as it was written (measured faster).
    sums_t = latents.new_zeros(width, padded)
    indices = torch.empty(n, dtype=torch.long, device=latents.device)
    sparse_sums = None
    for start in range(0, n, rows):
        chunk = latents[start : start + rows]
        stop = start + chunk.shape[0]
        # ||c||^2 - 2 z.c: the distance up to ||z||^2, which cancels in the argmin and in the softmax.
        scores = torch.addmm(sq_norms, chunk, codes.t(), beta=1.0, alpha=-2.0, out=buffer[: chunk.shape[0]])
        best, nearest, group_minima = grouped_argmin(scores)
        indices[start:stop] = nearest
        # The exponent's float32 operations, on the group minima: by monotone rounding, no entry's exponent
        # exceeds its group's, so a dead group holds exact zeros only.
        live = (group_minima - best.unsqueeze(1)).mul_(-inverse_temp) > DEAD_EXPONENT
        if int(live.sum()) <= SPARSE_PAIR_FRACTION * live.numel():
            pair_rows, pair_groups = live.nonzero(as_tuple=True)
            # index_select on flat views throughout: torch's advanced indexing costs several times more.
            pairs = pair_rows * num_groups + pair_groups
            exponents = scores.view(-1, ARGMIN_GROUP).index_select(0, pairs)
            exponents.sub_(best.index_select(0, pair_rows).unsqueeze(1)).mul_(-inverse_temp)
            # Inside live groups most entries are dead too: keep the live ones only.
            entries = (exponents.view(-1) > DEAD_EXPONENT).nonzero().squeeze(1)
            pair = entries // ARGMIN_GROUP
            row = pair_rows.index_select(0, pair)
            code = pair_groups.index_select(0, pair) * ARGMIN_GROUP + entries % ARGMIN_GROUP
            kernel = exponents.view(-1).index_select(0, entries)
            row_scale = _kernel_weights_(kernel, kernel_mass, owner=row, rows=chunk.shape[0])
            # The winners' weight enters the loss elsewhere: zero here (cheaper than filtering them out).
            kernel.mul_(row_scale.index_select(0, row)).mul_(code != nearest.index_select(0, row))
            if sparse_sums is None:
                sparse_sums = latents.new_zeros(padded, width)
            sparse_sums.index_add_(0, code, values.index_select(0, row + start).mul_(kernel.unsqueeze(1)))
        else:
            exponents = scores.sub_(best.unsqueeze(1)).mul_(-inverse_temp)
            row_scale = _kernel_weights_(F.threshold_(exponents, DEAD_EXPONENT, -math.inf), kernel_mass)
            scores.scatter_(1, nearest.unsqueeze(1), 0.0)
            sums_t.addmm_((values[start:stop] * row_scale.unsqueeze(1)).t(), scores)
    sums = sums_t.t() if sparse_sums is None else sums_t.t() + sparse_sums
    return sums[: codebook.shape[0]], indices


class KernelEmbeddingLoss(torch.autograd.Function):
    """``L_emb`` as a function of the codebook, with its O(K D) backward. Also returns the nearest codes.

    The winners' terms (weight 1, the bulk of the loss once the kernel is narrow) are computed directly from
    ``c_qi - z_i``; only the neighbours' go through the expanded form ``s ||c||^2 - 2 c.m + u``, whose
    cancellation would otherwise cost digits when the latents sit close to their codes.
    """

    @staticmethod
    def forward(ctx, codebook: Tensor, latents: Tensor, inverse_temp: float, kernel_mass: float, chunk_elements: int):
        with torch.autocast(device_type=latents.device.type, enabled=False):
            codes = codebook.detach().float()
            z = latents.detach().float()
            sq = z.pow(2).sum(1, keepdim=True)
            values = torch.cat([z, torch.ones_like(sq), sq], 1)
            sums, indices = kernel_code_sums(z, codes, values, inverse_temp, kernel_mass, chunk_elements)
            dim = z.shape[1]
            m, s, u = sums[:, :dim], sums[:, dim], sums[:, dim + 1]
            offsets = codes[indices] - z
            # dL_emb / dc_k * (N D / 2) = sum_i w_ik (c_k - z_i): neighbours s_k c_k - m_k, winners directly.
            direction = (s.unsqueeze(1) * codes - m).index_add_(0, indices, offsets)
            total = offsets.pow(2).sum() + (s * codes.pow(2).sum(1)).sum() - 2.0 * (codes * m).sum() + u.sum()
            scale = 1.0 / (z.shape[0] * dim)
        ctx.save_for_backward(direction)
        ctx.grad_scale = 2.0 * scale
        ctx.codebook_dtype = codebook.dtype
        ctx.mark_non_differentiable(indices)
        return total * scale, indices

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_indices: Tensor | None):
        (direction,) = ctx.saved_tensors
        return (direction * (grad_loss * ctx.grad_scale)).to(ctx.codebook_dtype), None, None, None, None


class RouteToNeighbours(torch.autograd.Function):
    """Supplementary Sec. 10: ``z~ + A - sg(A)`` with ``A = W_soft C``. The value is ``z~`` (``A - sg(A)`` is
    0); the decoder gradient ``G`` reaches the codes as ``W_soft^T G``, recomputed chunk by chunk in the
    backward pass so that ``W_soft`` is never stored."""

    @staticmethod
    def forward(
        ctx,
        quantized: Tensor,
        codebook: Tensor,
        latents: Tensor,
        inverse_temp: float,
        kernel_mass: float,
        chunk_elements: int,
    ):
        ctx.save_for_backward(codebook, latents.detach())
        ctx.settings = (inverse_temp, kernel_mass, chunk_elements)
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        codebook, latents = ctx.saved_tensors
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            with torch.autocast(device_type=grad.device.type, enabled=False):
                inverse_temp, kernel_mass, chunk_elements = ctx.settings
                grad_codebook, _ = kernel_code_sums(
                    latents.float(), codebook.detach().float(), grad.float(), inverse_temp, kernel_mass, chunk_elements
                )
            grad_codebook = grad_codebook.to(codebook.dtype)
        return grad, grad_codebook, None, None, None, None


class NonStationaryVQ(Quantizer):
    """NS-VQ: a learned table whose non-selected codes are pulled toward nearby current latents.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25).
        alpha: weight of the embedding loss L_emb (1.0).
        kernel_scale: lambda in ``min(1, lambda K p_ik)`` (0.01, the authors' default).
        tau: tau_0, the kernel temperature at step 0 (> 0); plays the role of ``2 sigma^2``.
        tau_schedule: "exp", "step", "cosine" or "constant"; its own knobs go in ``tau_schedule_options``
            (see ``tau_schedule.py``: exp ``decay_rate, decay_steps``; step ``gamma, step_size, warmup_steps``;
            cosine ``tau_min, total_steps``).
        tau_mode: "absolute" (tau as scheduled) or "relative": tau times a running mean of the winners'
            squared distance ``||z_i - c_qi||^2``, so the same tau fits any latent scale. Caution: in the
            quick trials of METHOD.md this naive scale-free rule collapsed utilisation to 20-27% (early on
            that distance is large, the kernel is flat and the codes clump); it is offered to be measured.
        straight_through: "standard" (``z + sg(q - z)``) or "paper" (Sec. 3.3.3:
            ``z + a q + sg((1 - a) q - z)``, ``a = 2 alpha / (N D)``: the selected code also receives a times
            the decoder gradient). "standard" keeps the tau -> 0 limit equal to vq.
        rule: "dense" (the kernel-weighted embedding loss above) or "routing" (supplementary Sec. 10: the
            plain embedding loss, and the decoder gradient routed to kernel-weighted neighbours,
            ``z~ + A - sg(A)`` with ``A = W_soft C``, the winner's weight set to 0). The authors pair routing
            with the paper straight-through.
        distance_ema_decay: decay of the running mean in relative mode, in (0, 1).
        chunk_elements: rows per chunk times K of the kernel block (memory and speed, not results).
        **tau_schedule_options: the schedule's knobs.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        alpha: float = 1.0,
        kernel_scale: float = 0.01,
        tau: float = 1.0,
        tau_schedule: str = "exp",
        tau_mode: str = "absolute",
        straight_through: str = "standard",
        rule: str = "dense",
        distance_ema_decay: float = 0.99,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        **tau_schedule_options,
    ):
        super().__init__(codebook_size, dim, beta)
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha (embedding-loss weight) must be a finite number >= 0, got {alpha!r}")
        if not (kernel_scale >= 0 and math.isfinite(kernel_scale)):
            raise ValueError(f"kernel_scale (lambda) must be a finite number >= 0, e.g. 0.01; got {kernel_scale!r}")
        for name, value, choices in (
            ("tau_mode", tau_mode, TAU_MODES),
            ("straight_through", straight_through, STRAIGHT_THROUGH),
            ("rule", rule, RULES),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
        if not 0.0 < distance_ema_decay < 1.0:
            raise ValueError(f"distance_ema_decay must lie strictly between 0 and 1, got {distance_ema_decay!r}")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
        self.alpha = float(alpha)
        self.kernel_scale = float(kernel_scale)
        self.tau_schedule = build_tau_schedule(tau_schedule, tau, **tau_schedule_options)
        self.tau_mode = tau_mode
        self.straight_through = straight_through
        self.rule = rule
        self.distance_ema_decay = float(distance_ema_decay)
        self.chunk_elements = chunk_elements
        self.step = 0
        self.embedding = nn.Embedding(codebook_size, dim)
        # As vq (uniform in +-1/K): codes start near the origin, where a fresh encoder puts its latents.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if tau_mode == "relative":
            # NaN until the first batch sets the scale.
            self.register_buffer("winner_distance_ema", torch.tensor(math.nan))

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def set_step(self, step: int) -> None:
        self.tau_schedule(step)  # validates the step
        self.step = step

    @property
    def current_tau(self) -> float:
        """The temperature the next forward uses (relative mode: NaN before the first batch)."""
        tau = self.tau_schedule(self.step)
        if self.tau_mode == "relative":
            tau *= float(self.winner_distance_ema)
        return tau

    def forward(self, z: Tensor) -> QuantizerOutput:
        flat = self.flatten(z)
        latents = flat.detach().float()
        tau = self._temperature(latents)
        kernel_mass = self.kernel_scale * self.codebook_size
        inverse_temp = inverse_temperature(tau)
        if self.rule == "dense":
            embedding_loss, indices = KernelEmbeddingLoss.apply(
                self.codebook, latents, inverse_temp, kernel_mass, self.chunk_elements
            )
            q = F.embedding(indices, self.codebook)
        else:
            indices = nearest_codes(latents, self.codebook)
            q = F.embedding(indices, self.codebook)
            embedding_loss = F.mse_loss(q, latents)
        loss = self.alpha * embedding_loss + self.beta * F.mse_loss(flat.float(), q.detach())
        if self.tau_mode == "relative" and self.training:
            self._update_distance_ema(latents, q.detach())

        codes = q.to(flat.dtype)
        if self.straight_through == "paper":
            share = 2.0 * self.alpha / flat.numel()
            # Value exactly q; gradient G to z and share * G to the selected codes.
            quantized = codes.detach() + (flat - flat.detach()) + share * (codes - codes.detach())
        else:
            quantized = straight_through(flat, codes)
        if self.rule == "routing":
            quantized = RouteToNeighbours.apply(
                quantized, self.codebook, latents, inverse_temp, kernel_mass, self.chunk_elements
            )
        return self.output(z, quantized, indices, loss)

    def _temperature(self, latents: Tensor) -> float:
        tau = self.tau_schedule(self.step)
        if self.tau_mode == "absolute":
            return tau
        scale = float(self.winner_distance_ema)
        if math.isnan(scale):  # first batch: its own winners' distance
            with torch.no_grad():
                q = F.embedding(nearest_codes(latents, self.codebook), self.codebook).float()
                scale = float((latents - q).pow(2).sum(1).mean())
        return tau * scale

    @torch.no_grad()
    def _update_distance_ema(self, latents: Tensor, q: Tensor) -> None:
        distance = (latents - q.float()).pow(2).sum(1).mean()
        ema = self.winner_distance_ema
        if torch.isnan(ema):
            ema.copy_(distance)
        else:
            ema.mul_(self.distance_ema_decay).add_(distance, alpha=1.0 - self.distance_ema_decay)
