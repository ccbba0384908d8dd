"""TransVQ (Lu et al., arXiv 2602.18896): the codebook is the output of a small transformer applied to a
frozen Gaussian base codebook, so every gradient step moves every code and no code is left behind when
the encoder's latents drift.

The whole codebook is one sequence of K tokens. Attention over it is linear (phi(x) = elu(x) + 1), so a
65,536-code book costs O(K) time and memory; softmax attention would need a K x K matrix (16 GiB).
The codebook depends only on the parameters, never on the batch: it is computed once per forward in
training, cached in eval mode, and ``export_codebook()`` turns it into a plain table, so a published
tokenizer costs exactly what a plain VQ tokenizer costs at inference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput

# Scale of the learned per-index position embeddings at initialisation: small next to the unit-variance
# projected base codes, so the first codebook is a smooth function of C0 (distinct, isotropic codes)
# and the per-index freedom is learned rather than imposed as noise.
POSITION_INIT_STD = 0.02


def feature_map(x: Tensor) -> Tensor:
    """The linear-attention kernel feature map ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020).

    Written as ``x + 1`` for ``x > 0`` and ``exp(x)`` otherwise, the same function: ``elu(x) + 1`` computes
    ``(exp(x) - 1) + 1``, which rounds to exactly 0 in float32 below x ~ -17, and a query whose features
    are all 0 divides by a zero attention normaliser.
    """
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp_max(0.0)))


def linear_attention(queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Non-causal linear attention over one sequence, in O(L) time and memory.

    ``out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)``, computed by associativity as
    ``phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))``: the L x L matrix never exists.

    Args:
        queries: ``[L, d]``.
        keys: ``[L, d]``.
        values: ``[L, e]``.

    Returns:
        ``[L, e]``.
    """
    phi_q, phi_k = feature_map(queries), feature_map(keys)
    key_value = phi_k.t() @ values  # [d, e]
    normaliser = phi_q @ phi_k.sum(0)  # [L]
    return (phi_q @ key_value) / normaliser.unsqueeze(1)


class CodebookTransformer(nn.Module):
    """``T_theta``: one pre-LayerNorm linear-attention block that maps the base codebook to the codebook.

    ``h = C0 W_in + P``; ``h += LinearAttention(LN(h))``; ``h += FFN(LN(h))``; ``C = LN(h) W_out``.
    One head, FFN ratio 2 with GELU, no dropout, no bias on the projections (METHOD.md, TransVQ).

    Args:
        codebook_size: K, the sequence length (one token per code).
        dim: D, channels of the codes.
        width: channels inside the block.
    """

    def __init__(self, codebook_size: int, dim: int, width: int):
        super().__init__()
        self.input_proj = nn.Linear(dim, width, bias=False)
        self.position = nn.Parameter(torch.randn(codebook_size, width) * POSITION_INIT_STD)
        self.attention_norm = nn.LayerNorm(width)
        self.query_key_value = nn.Linear(width, 3 * width, bias=False)
        self.attention_out = nn.Linear(width, width, bias=False)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 2 * width, bias=False), nn.GELU(), nn.Linear(2 * width, width, bias=False)
        )
        self.output_norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, dim, bias=False)
        # Base codes have E||c0||^2 = 1 (entries N(0, 1/D)); W_in ~ N(0, 1) keeps the projected tokens at
        # unit variance per channel, on the scale LayerNorm expects, instead of the default init's 1/(3D).
        nn.init.normal_(self.input_proj.weight, std=1.0)
        # The output LayerNorm emits unit-variance rows (sum of squares = width); W_out ~ N(0, 1/(width D))
        # then gives codes with E||c||^2 = width * D / (width D) = 1, the base codebook's scale. The default
        # init (variance 1/(3 width) per weight) would give E||c||^2 = D / 3, codes far outside a freshly
        # initialised encoder's latents.
        nn.init.normal_(self.output_proj.weight, std=1.0 / math.sqrt(width * dim))

    def forward(self, base_codebook: Tensor) -> Tensor:
        """``[K, D]`` base codebook -> ``[K, D]`` codebook."""
        h = self.input_proj(base_codebook) + self.position
        queries, keys, values = self.query_key_value(self.attention_norm(h)).chunk(3, dim=-1)
        h = h + self.attention_out(linear_attention(queries, keys, values))
        h = h + self.ffn(self.ffn_norm(h))
        return self.output_proj(self.output_norm(h))


class TransVQ(Quantizer):
    """TransVQ: ``C = T_theta(C0)``, nearest-code lookup in C, ``L = ||sg(z) - q||^2 + beta ||z - sg(q)||^2``.

    Only theta learns; C0 is a frozen buffer (saved in the state dict, so a checkpoint reproduces its
    codebook exactly). In eval mode the codebook is computed once and cached; ``train()`` and
    ``load_state_dict()`` drop the cache. Changing parameters in place while in eval mode (an optimizer
    step without ``train()``) is not detected: call ``train()`` before training.

    Args:
        codebook_size: K, number of codes.
        dim: D, channels of the latents.
        beta: commitment weight (0.25 in VQ-VAE and in the paper).
        width: channels of the codebook transformer (256 in the paper).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, width: int = 256):
        super().__init__(codebook_size, dim, beta)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(
                f"width (channels of the codebook transformer) must be a positive integer (256 in the paper); got {width!r}"
            )
        self.width = width
        self.register_buffer("base_codebook", torch.randn(codebook_size, dim) / math.sqrt(dim))
        self.transformer = CodebookTransformer(codebook_size, dim, width)
        # Not persistent: it is a function of the parameters, and .to() must move it with them.
        self.register_buffer("_eval_codebook", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._drop_cache())

    def _drop_cache(self) -> None:
        self._eval_codebook = None

    def _compute_codebook(self) -> Tensor:
        # float32 whatever the autocast context: the attention normaliser sums K positive terms, and
        # bf16 cannot hold such a sum to better than ~1% for K in the thousands. The cost does not grow
        # with the batch, so the precision is nearly free.
        with torch.autocast(device_type=self.base_codebook.device.type, enabled=False):
            return self.transformer(self.base_codebook.float())

    @property
    def codebook(self) -> Tensor:
        if self.training:
            return self._compute_codebook()
        if self._eval_codebook is None:
            with torch.no_grad():
                self._eval_codebook = self._compute_codebook()
        return self._eval_codebook

    def export_codebook(self) -> Tensor:
        """The current codebook as a plain ``[K, D]`` table: detached, a copy, no graph.

        Returns:
            ``[K, D]`` float32 tensor; a plain VQ table initialised with it quantizes identically.
        """
        with torch.no_grad():
            return self.codebook.detach().clone()

    def train(self, mode: bool = True) -> "TransVQ":
        self._drop_cache()
        return super().train(mode)

    def forward(self, z: Tensor) -> QuantizerOutput:
        return self.quantize_with_table(z, self.codebook)
