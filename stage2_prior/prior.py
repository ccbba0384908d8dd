"""The autoregressive prior: a Llama causal LM over the raster-order token grid of a VQ tokenizer.

Why Llama and not GPT-2: LlamaGen (Sun et al. 2024, arXiv 2406.06525) shows that the plain Llama recipe
(RMSNorm, SwiGLU, rotary positions, no biases) is a strong class-conditional image-token generator. Rotary
positions are relative, so "the code one row up" is the same offset (the grid width) at every position of
the raster; GPT-2's learned absolute table would have to learn that relation once per position. LlamaGen
uses a 2-D rotary variant; transformers ships the 1-D one, which we use unchanged, so that a saved prior is
an ordinary Llama checkpoint (``AutoModelForCausalLM`` loads its weights and computes its logits).

Vocabulary, for a tokenizer of ``K`` codes and ``C`` classes (``C = 0``: unconditional)::

    [0, K)          image codes
    K + c           class token of class c, c in [0, C)
    K + C           the null token: the start token of an unconditional prior, and the "no class" token that
                    replaces the class token under label dropout (classifier-free guidance, Ho & Salimans 2022)

Every sequence is one conditioning token followed by the ``h * w`` codes of the grid in raster order, so
the context is ``h * w + 1`` positions and the vocabulary ``K + C + 1`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
# PreTrainedModel is imported for diffusers' pipeline loader (0.42): it looks a component's loadable base
# classes up as attributes of the component's own module, and fails without this name here.
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel  # noqa: F401

# Positions in front of the grid: one class (or null) token.
PREFIX_LENGTH = 1

# Named sizes. "base" is the default; "tiny" is for tests, CPU demos and the sampling benchmark. The
# feed-forward width follows LlamaGen's SwiGLU rule (about 8/3 of the width, rounded up to a multiple of 64).
PRIOR_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
    "small": {"hidden_size": 256, "num_layers": 6, "num_heads": 4},
    "base": {"hidden_size": 384, "num_layers": 8, "num_heads": 6},
}


class ImageTokenPrior(LlamaForCausalLM):
    """A Llama causal LM whose config also records the token grid it models.

    Extra config attributes (saved in ``config.json``, restored by ``from_pretrained``): ``codebook_size``,
    ``grid_size`` ``[h, w]``, ``num_classes`` and ``tokenizer_hash`` (the fingerprint of the tokenizer whose
    tokens it models; see :func:`stage2_prior.token_dataset.tokenizer_fingerprint`). Build one with
    :func:`build_prior`.

    The only change to generation: with ``classifier_free_guidance=True`` (a :meth:`generate` keyword),
    every forward pass runs the batch twice, the second copy with the null token in place of the class
    token, so the logits have ``2 B`` rows (conditional first) for a guidance logits processor to combine
    back into ``B``. The cache holds ``2 B`` rows; ``generate`` itself only ever sees ``B`` sequences.
    """

    def __init__(self, config: LlamaConfig):
        missing = [k for k in ("codebook_size", "grid_size", "num_classes") if not hasattr(config, k)]
        if missing:
            raise ValueError(
                f"the config lacks the prior's attributes {missing}; create priors with "
                "stage2_prior.build_prior(...) or load them with ImageTokenPrior.from_pretrained(path)"
            )
        expected_vocab = config.codebook_size + config.num_classes + 1
        if config.vocab_size != expected_vocab:
            raise ValueError(
                f"config.vocab_size={config.vocab_size} but codebook_size + num_classes + 1 = {expected_vocab}; "
                "the config was edited by hand: rebuild it with build_prior"
            )
        super().__init__(config)
        # transformers picks the loss from the class name ("...ForCausalLM"); ours does not match, so say it.
        self.loss_type = "ForCausalLM"

    # -- the token layout -------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return int(self.config.codebook_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.config.grid_size
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def num_grid_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def null_token_id(self) -> int:
        """Start token of an unconditional prior; "no class" token of a conditional one."""
        return self.codebook_size + self.num_classes

    @property
    def special_token_ids(self) -> list[int]:
        """Every id that is not an image code (class tokens and the null token)."""
        return list(range(self.codebook_size, self.config.vocab_size))

    def conditioning_tokens(self, class_labels: Tensor | None, batch_size: int) -> Tensor:
        """The first token of every sequence: ``long [B, 1]``.

        Args:
            class_labels: ``long [B]`` in ``[0, num_classes)``; entries equal to ``-1`` mean "no class" (the
                null token). ``None``: the null token for every row.
            batch_size: B, used when ``class_labels`` is None.
        """
        device = self.device
        if class_labels is None:
            return torch.full((batch_size, 1), self.null_token_id, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if self.num_classes == 0 and bool((labels >= 0).any()):
            raise ValueError("this prior is unconditional (num_classes=0); pass class_labels=None")
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}) (or -1 for no class), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        tokens = torch.where(labels >= 0, self.codebook_size + labels, torch.full_like(labels, self.null_token_id))
        return tokens[:, None]

    def token_sequences(self, grids: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Conditioning token + raster-order codes: ``long [B, 1 + h * w]``, the model's input and target.

        Args:
            grids: ``long [B, h, w]`` or already flattened ``[B, h * w]`` codes in ``[0, codebook_size)``.
            class_labels: as in :meth:`conditioning_tokens`.
        """
        codes = grids.reshape(grids.shape[0], -1).long()
        if codes.shape[1] != self.num_grid_tokens:
            raise ValueError(
                f"expected {self.num_grid_tokens} codes per grid (grid_size={self.grid_size}), got {codes.shape[1]}; "
                "the token dataset was made with another image size or tokenizer"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got range [{int(codes.min())}, {int(codes.max())}]; "
                "the tokens come from a tokenizer with a larger codebook"
            )
        prefix = self.conditioning_tokens(class_labels, codes.shape[0]).to(codes.device)
        return torch.cat([prefix, codes], dim=1)

    def lm_inputs(self, grids: Tensor, class_labels: Tensor | None = None) -> dict[str, Tensor]:
        """``input_ids`` and ``labels`` for the causal-LM loss: every code is a target, the conditioning token
        (label -100) is not. Call the model (or its DDP wrapper) on them: ``model(**prior.lm_inputs(...)).loss``."""
        input_ids = self.token_sequences(grids, class_labels)
        labels = input_ids.clone()
        labels[:, :PREFIX_LENGTH] = -100
        return {"input_ids": input_ids, "labels": labels}

    def grid_loss(self, grids: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy (nats) over the grid's codes."""
        return self(**self.lm_inputs(grids, class_labels)).loss

    # -- generation -------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self, input_ids: Tensor, *args, classifier_free_guidance: bool = False, **kwargs
    ) -> dict:
        """transformers' inputs for one generation step; under guidance, the batch twice (see the class docstring).

        Args:
            input_ids: ``long [B, t]``, the sequences so far (``generate`` keeps ``B`` rows).
            classifier_free_guidance: append an unconditional copy of every row (null token first).
        """
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if not classifier_free_guidance:
            return inputs
        step_ids = inputs["input_ids"]
        unconditional = step_ids.clone()
        # The conditioning token is in this step's input only when the whole sequence is fed: the prefill,
        # or every step when the KV cache is off. Later cached steps feed the newest code alone.
        if step_ids.shape[1] == input_ids.shape[1]:
            unconditional[:, 0] = self.null_token_id
        inputs["input_ids"] = torch.cat([step_ids, unconditional], dim=0)
        for key in ("attention_mask", "position_ids"):
            if isinstance(inputs.get(key), Tensor):
                inputs[key] = inputs[key].repeat(2, *([1] * (inputs[key].dim() - 1)))
        return inputs


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def build_prior(
    codebook_size: int,
    grid_size: Sequence[int] = (16, 16),
    num_classes: int = 0,
    size: str = "base",
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    tokenizer_hash: str | None = None,
    class_names: Sequence[str] | None = None,
    rope_theta: float = 10000.0,
) -> ImageTokenPrior:
    """A freshly initialised prior over ``h x w`` grids of a ``codebook_size``-code tokenizer.

    Args:
        codebook_size: K, the tokenizer's number of codes.
        grid_size: ``(h, w)`` of the token grid (16 x 16 for 64 px images and a 4x downsampling tokenizer).
        num_classes: C > 0 for a class-conditional prior (plus a null class for label dropout); 0 for none.
        size: a key of :data:`PRIOR_SIZES`; the explicit size arguments below override its entries.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads (``hidden_size`` must be a multiple).
        intermediate_size: SwiGLU width; default about 8/3 of the width, rounded up to a multiple of 64.
        tokenizer_hash: fingerprint of the tokenizer whose codes this prior models (recorded in the config).
        class_names: a readable name per class (recorded in the config), e.g. ``"smiling=1,glasses=0"``.
        rope_theta: rotary base frequency.

    Returns:
        An :class:`ImageTokenPrior` (a transformers ``LlamaForCausalLM``) with vocabulary ``K + C + 1`` and
        context ``h * w + 1``.
    """
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
        raise ValueError(f"codebook_size must be an integer >= 2, got {codebook_size!r}")
    if len(grid_size) != 2:
        raise ValueError(f"grid_size must be (height, width), got {grid_size!r}")
    h, w = (_check_positive_int("grid_size entries", int(v) if isinstance(v, Tensor) else v) for v in grid_size)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0 = unconditional), got {num_classes!r}")
    if size not in PRIOR_SIZES:
        raise ValueError(f"unknown prior size {size!r}; choose one of {sorted(PRIOR_SIZES)}")
    preset = PRIOR_SIZES[size]
    width = _check_positive_int("hidden_size", hidden_size if hidden_size is not None else preset["hidden_size"])
    layers = _check_positive_int("num_layers", num_layers if num_layers is not None else preset["num_layers"])
    heads = _check_positive_int("num_heads", num_heads if num_heads is not None else preset["num_heads"])
    if width % heads:
        raise ValueError(f"hidden_size={width} must be a multiple of num_heads={heads}")
    if intermediate_size is None:
        intermediate_size = -(-8 * width // 3 // 64) * 64
    _check_positive_int("intermediate_size", intermediate_size)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}; give one name per class")

    null_token = codebook_size + num_classes
    config = LlamaConfig(
        vocab_size=codebook_size + num_classes + 1,
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=h * w + PREFIX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        # No end token: every grid has exactly h * w codes. A default eos id (2) would be an image code and
        # would stop generation early whenever that code came up.
        bos_token_id=null_token,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        codebook_size=codebook_size,
        grid_size=[h, w],
        num_classes=num_classes,
        tokenizer_hash=tokenizer_hash,
        class_names=list(class_names) if class_names is not None else None,
    )
    return ImageTokenPrior(config)
