"""Training configs: dataclasses filled from a YAML file, then from ``--key value`` command-line overrides.

``load_config`` and ``save_config`` work for any dataclass (stage two reuses them); the tokenizer's own
config, :class:`TokenizerTrainingConfig`, is below them. Parsing is transformers' ``HfArgumentParser``:
one ``--field`` per dataclass field, typed by the annotation (``list[int]`` takes several values,
``bool`` takes ``true``/``false`` or nothing, ``Literal`` lists its choices in ``--help``); a ``dict``
field takes a YAML/JSON mapping, e.g. ``--quantizer_options '{tau: 2.0}'``.

    cfg = load_config(TokenizerTrainingConfig, ["--config", "configs/tokenizer_tiny.yaml", "--max_steps", "50"])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from transformers import HfArgumentParser

from .quantizers import QUANTIZERS

ConfigT = TypeVar("ConfigT")


def _yaml_mapping(text: str) -> dict:
    """argparse type for ``dict`` fields: a YAML (or JSON) mapping given on the command line."""
    value = yaml.safe_load(text)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{tau: 2.0}}', got {text!r}")
    return value


def _unknown_key_error(cls: type, keys: Sequence[str], source: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(
        f"unknown config key(s) in {source}: {', '.join(parts)}. {cls.__name__} has no such field; "
        f"valid keys: {', '.join(names)}"
    )


def read_config_file(cls: type, path: str | Path) -> dict:
    """Read a YAML config file as a dict, checking that every key is a field of ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; pass --config with a YAML file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in known]
    if unknown:
        raise _unknown_key_error(cls, unknown, str(path))
    return values


def load_config(cls: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    """Build a ``cls`` dataclass from ``--config file.yaml`` (optional) and ``--key value`` overrides.

    Precedence: command line > YAML file > the dataclass defaults. Every field of ``cls`` needs a default
    (argparse would demand a field without one on the command line even when the file sets it).

    Args:
        cls: the config dataclass.
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The filled dataclass (its ``__post_init__`` validates values).

    Raises:
        ValueError: a key in the file or on the command line that is not a field of ``cls``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument("--config", default=None)
    known, rest = config_flag.parse_known_args(argv)
    file_values = read_config_file(cls, known.config) if known.config else {}

    parser = HfArgumentParser(cls)
    parser.add_argument("--config", default=None, help="YAML file of field: value; the command line overrides it")
    parser.register("type", dict, _yaml_mapping)
    # argparse runs string defaults through the field's type, so "5e-4" from YAML becomes a float.
    parser.set_defaults(**file_values)
    # The outputs are (config, namespace holding --config, remaining strings).
    config, _, remaining = parser.parse_args_into_dataclasses(
        args=rest, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        flags = [arg.lstrip("-").split("=")[0] for arg in remaining if arg.startswith("--")] or remaining
        raise _unknown_key_error(cls, flags, "the command line")
    return config


def save_config(config, path: str | Path) -> None:
    """Write a config dataclass as YAML that ``load_config(type(config), ["--config", path])`` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_positive(config, names: Sequence[str], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass
class TokenizerTrainingConfig:
    """Everything that defines a stage-one training run. Field groups: model, data, loss, optimisation,
    checkpointing, logging. ``batch_size`` is per process; the effective batch is
    ``batch_size * num_processes * gradient_accumulation_steps``."""

    # -- model (VQTokenizer's config) --------------------------------------------------------------
    quantizer: str = "vq"
    codebook_size: int = 1024
    quantizer_options: dict = field(default_factory=dict)
    latent_channels: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    down_block_types: list[str] | None = None  # None: DownEncoderBlock2D for every block
    up_block_types: list[str] | None = None  # None: UpDecoderBlock2D for every block
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False

    # -- data ---------------------------------------------------------------------------------------
    dataset: str = "synthetic-faces"
    dataset_split: str = "train"
    image_size: int = 64
    num_images: int | None = None  # size of the whole source (all splits); None: its default
    random_flip: bool = False
    data_seed: int = 0  # seeds the per-epoch shuffle order (and synthetic data)
    dataloader_num_workers: int = 0
    cache_dir: str | None = None

    # -- loss (VQGANLoss) ---------------------------------------------------------------------------
    pixel_loss: Literal["mse", "l1"] = "mse"
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.0  # LPIPS; > 0 needs the LPIPS backbone weights
    quantizer_weight: float = 1.0
    gan_weight: float = 0.0  # 0: no discriminator at all
    disc_start_step: int = 0
    disc_learning_rate: float | None = None  # None: learning_rate
    disc_channels: int = 64  # PatchGAN width (64 in pix2pix / taming)
    disc_layers: int = 3  # PatchGAN stride-2 convs (3: 70 x 70 receptive field)

    # -- optimisation -------------------------------------------------------------------------------
    max_steps: int = 1000  # optimizer updates
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    lr_schedule: Literal["constant", "cosine", "exponential"] = "constant"
    lr_warmup_steps: int = 0
    lr_decay_rate: float = 0.995  # exponential: factor per lr_decay_steps
    lr_decay_steps: int | None = None  # exponential: None = one epoch (the paper decays 0.995 per epoch)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    use_ema: bool = False  # EMA of the weights; the EMA weights are what gets saved
    ema_decay: float = 0.999
    seed: int = 0

    # -- checkpointing ------------------------------------------------------------------------------
    output_dir: str = "outputs/tokenizer"
    checkpoint_every: int = 500
    keep_last: int = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder

    # -- logging ------------------------------------------------------------------------------------
    log_every: int = 10
    image_every: int = 500  # reconstruction grid PNG
    num_grid_images: int = 8
    report_to: Literal["tensorboard", "none"] = "tensorboard"

    def __post_init__(self):
        check_choice("quantizer", self.quantizer, sorted(QUANTIZERS))
        check_choice("pixel_loss", self.pixel_loss, ("mse", "l1"))
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine", "exponential"))
        check_choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        check_choice("report_to", self.report_to, ("tensorboard", "none"))
        check_positive(
            self,
            ("codebook_size", "latent_channels", "image_size", "max_steps", "batch_size",
             "gradient_accumulation_steps", "learning_rate", "checkpoint_every", "keep_last", "log_every",
             "image_every", "num_images", "lr_decay_steps", "disc_learning_rate", "max_grad_norm",
             "disc_channels", "disc_layers"),
        )
        check_positive(
            self,
            ("pixel_weight", "perceptual_weight", "quantizer_weight", "gan_weight", "disc_start_step",
             "weight_decay", "lr_warmup_steps", "num_grid_images", "dataloader_num_workers"),
            allow_zero=True,
        )
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"lr_decay_rate must lie in (0, 1], got {self.lr_decay_rate!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)
            if types is not None and len(types) != len(self.block_out_channels):
                raise ValueError(
                    f"{name} has {len(types)} entries but block_out_channels has {len(self.block_out_channels)}; "
                    "give one block type per entry (or leave it unset for plain blocks)"
                )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the downsampling factor {factor} "
                f"(2 ** (len(block_out_channels) - 1))"
            )

    def tokenizer_kwargs(self) -> dict:
        """The ``VQTokenizer`` constructor arguments this config describes."""
        blocks = len(self.block_out_channels)
        return dict(
            sample_size=self.image_size,
            down_block_types=tuple(self.down_block_types or ["DownEncoderBlock2D"] * blocks),
            up_block_types=tuple(self.up_block_types or ["UpDecoderBlock2D"] * blocks),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            quantizer=self.quantizer,
            codebook_size=self.codebook_size,
            quantizer_options=dict(self.quantizer_options),
        )
