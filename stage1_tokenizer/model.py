"""The image tokenizer: diffusers' VQ-VAE encoder and decoder around any quantizer of this project.

The conv stacks are the ``Encoder`` / ``Decoder`` that diffusers' ``VQModel`` uses; 1x1 convs map into
(``quant_conv``) and out of (``post_quant_conv``) the quantizer. The quantizer is chosen by name from
``stage1_tokenizer.quantizers.QUANTIZERS`` with its own options, so every method of the paper trains in
the same network. Save/load/config come from diffusers' ``ModelMixin`` + ``ConfigMixin`` (safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from .quantizers import build_quantizer

# Quantizers whose inference is a Euclidean nearest-code search over ``.codebook`` followed by a table
# lookup: exactly what a plain "vq" table does, so their trained codebook exports as one. "fc" looks codes
# up by cosine in a projected space and cannot be exported that way.
EXPORTABLE_AS_TABLE = ("vq", "ema", "nsvq", "simvq", "transvq")


@dataclass
class TokenizerOutput(BaseOutput):
    """What ``VQTokenizer.forward`` returns.

    Attributes:
        reconstruction: ``[B, C, H, W]``, the decoded images, NOT clamped (the loss sees the raw output).
        indices: ``long [B, h, w]``, the token grid.
        quantizer_loss: scalar, every loss term of the quantizer with its weight.
        perplexity: scalar, perplexity of this batch's code histogram.

    Every field is always set; the None defaults exist because accelerate's mixed-precision wrapper
    rebuilds the output from a dict (``TokenizerOutput({...})``), which diffusers' ``BaseOutput``
    supports only when the fields after the first have defaults.
    """

    reconstruction: Tensor
    indices: Tensor | None = None
    quantizer_loss: Tensor | None = None
    perplexity: Tensor | None = None


class VQTokenizer(ModelMixin, ConfigMixin):
    r"""A VQ-VAE / VQ-GAN image tokenizer: images in ``[-1, 1]`` <-> grids of codebook indices.

    The constructor arguments are the config (saved to ``config.json`` by ``save_pretrained``).

    Args:
        in_channels: channels of the input images.
        out_channels: channels of the reconstructed images.
        sample_size: the image side the tokenizer is trained at (metadata; any multiple of the
            downsampling factor works).
        down_block_types: encoder blocks, e.g. ``("DownEncoderBlock2D",) * 3``; one per entry of
            ``block_out_channels``.
        up_block_types: decoder blocks, e.g. ``("UpDecoderBlock2D",) * 3``.
        block_out_channels: channels of each block. The downsampling factor is
            ``2 ** (len(block_out_channels) - 1)``.
        layers_per_block: resnet layers per encoder block (the decoder uses one more, as in diffusers).
        act_fn: activation of the resnets.
        latent_channels: D, the channels of the latents and of every code.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        mid_block_add_attention: self-attention in the middle blocks (VQGAN has it; the paper's small conv
            VQ-VAE does not).
        quantizer: a name from ``stage1_tokenizer.quantizers.QUANTIZERS``.
        codebook_size: K.
        quantizer_options: keyword options of that quantizer (e.g. ``{"tau": 1.0}`` for nsvq).
    """

    _skip_layerwise_casting_patterns = ["quantize"]
    _supports_group_offloading = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 64,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 3,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 3,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 64,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        quantizer: str = "vq",
        codebook_size: int = 1024,
        quantizer_options: dict | None = None,
    ):
        super().__init__()
        if not (len(down_block_types) == len(up_block_types) == len(block_out_channels) >= 1):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({len(block_out_channels)}) must have the same, non-zero length"
            )
        bad_groups = [c for c in block_out_channels if c % norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels; "
                f"{bad_groups} are not multiples of it"
            )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=tuple(down_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        # Named `quantize` (as in diffusers' VQModel): `quantizer` is a config key, and ConfigMixin would
        # answer `self.quantizer` with the config string.
        self.quantize = build_quantizer(quantizer, codebook_size, latent_channels, **(quantizer_options or {}))
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )

    # -- presets -----------------------------------------------------------------------------------
    @classmethod
    def paper_celebahq64(
        cls, quantizer: str = "vq", codebook_size: int = 1024, quantizer_options: dict | None = None
    ) -> "VQTokenizer":
        """The paper's small conv VQ-VAE for CelebA-HQ 64 x 64: f = 4 (16 x 16 tokens), D = 64, K = 1024.

        Plain residual down/up blocks and no attention anywhere (a conv VQ-VAE, not a VQGAN).
        """
        return cls(
            sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            latent_channels=64,
            mid_block_add_attention=False,
            quantizer=quantizer,
            codebook_size=codebook_size,
            quantizer_options=quantizer_options,
        )

    # -- geometry ----------------------------------------------------------------------------------
    @property
    def downsampling_factor(self) -> int:
        """f: image side / token-grid side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def grid_size(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token-grid ``(h, w)`` for images of side ``image_size`` (default: the config's sample_size)."""
        size = self.config.sample_size if image_size is None else image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the downsampling factor {f}; "
                f"resize or crop the images to a multiple of {f}"
            )
        return height // f, width // f

    @property
    def last_layer_weight(self) -> Tensor:
        """The decoder's output conv weight: VQGAN's adaptive GAN weight balances gradients at this layer."""
        return self.decoder.conv_out.weight

    def set_step(self, step: int) -> None:
        """Advance the quantizer's step-dependent schedules (NS-VQ's tau); a no-op for the others."""
        self.quantize.set_step(step)

    # -- the three entry points --------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.config.in_channels:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"expected images of shape [B, {self.config.in_channels}, H, W] in [-1, 1], got {shape}"
            )
        self.grid_size(tuple(images.shape[-2:]))

    def _latents(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def _pixels(self, quantized: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> token grid ``long [B, H/f, W/f]``.

        Call ``.eval()`` first (``from_pretrained`` does): quantizers with training-time state (EMA
        codebooks) update it in train mode.
        """
        return self.quantize(self._latents(images)).indices

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Token grid ``long [B, h, w]`` -> images ``[B, C, h*f, w*f]``, clamped to ``[-1, 1]``.

        Clamped because these are the images a user sees; ``forward`` does not clamp, so that the training
        loss keeps its gradient where the decoder overshoots.
        """
        if not isinstance(indices, Tensor) or indices.dim() != 3:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"expected a token grid of shape [B, h, w], got {shape}")
        codes = self.quantize.embed(indices).to(self.post_quant_conv.weight.dtype)
        return self._pixels(codes).clamp(-1.0, 1.0)

    def forward(self, images: Tensor, return_dict: bool = True) -> TokenizerOutput | tuple:
        """Encode, quantize, decode: the training pass.

        Args:
            images: ``[B, C, H, W]`` in ``[-1, 1]``, H and W multiples of the downsampling factor.
            return_dict: return a :class:`TokenizerOutput` (else the tuple of its fields).

        Returns:
            :class:`TokenizerOutput` with the unclamped reconstruction ``[B, C, H, W]``, indices
            ``[B, H/f, W/f]``, the quantizer loss and the batch perplexity.
        """
        quantized = self.quantize(self._latents(images))
        reconstruction = self._pixels(quantized.quantized)
        output = TokenizerOutput(
            reconstruction=reconstruction,
            indices=quantized.indices,
            quantizer_loss=quantized.loss,
            perplexity=quantized.perplexity,
        )
        return output if return_dict else output.to_tuple()

    # -- publishing --------------------------------------------------------------------------------
    def export_for_inference(self) -> "VQTokenizer":
        """A copy whose quantizer is a frozen plain ``"vq"`` table holding this tokenizer's codebook.

        SimVQ and TransVQ compute their codebook from trained parameters (a linear map, a transformer);
        the copy stores the computed ``[K, D]`` table instead, so the published tokenizer needs neither and
        encodes and decodes exactly as this one does (same nearest-code search, same codes).

        Returns:
            A new ``VQTokenizer`` in eval mode on this tokenizer's device and dtype.
        """
        name = self.config.quantizer
        if name not in EXPORTABLE_AS_TABLE:
            raise ValueError(
                f"quantizer {name!r} does not look codes up by Euclidean distance, so its codebook cannot be "
                f"exported as a plain table; publish the tokenizer as it is (export works for "
                f"{list(EXPORTABLE_AS_TABLE)})"
            )
        quantizer = self.quantize
        codebook = quantizer.export_codebook() if hasattr(quantizer, "export_codebook") else quantizer.codebook
        exported = type(self).from_config(
            self.config, quantizer="vq", quantizer_options={"beta": quantizer.beta}
        )
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("quantize.")}
        state["quantize.embedding.weight"] = codebook.detach()
        exported.load_state_dict(state)
        exported.to(self.device)
        if exported.dtype != self.dtype:
            exported.to(self.dtype)
        exported.quantize.embedding.weight.requires_grad_(False)
        return exported.eval()
