"""Training the autoregressive prior on a token-grid dataset, under ``accelerate`` (one or several processes).

The loop is the usual accelerate one (gradient accumulation, mixed precision, DDP, trackers) with the
checkpointing of stage one (:class:`stage1_tokenizer.checkpoints.CheckpointManager`: atomic folders, exact
resume, the NaN guard). What is specific here:

- Batches are a pure function of the micro-step: micro-step ``m`` of epoch ``e`` takes rows
  ``perm_e[k G : (k + 1) G]`` (``G`` = batch size x processes, ``perm_e`` a permutation seeded by
  ``(seed, e)``), and process ``p`` its ``p``-th slice. Label dropout draws from a generator seeded by
  ``(seed, m, p)``. So a resumed run sees exactly the batches and dropout masks an uninterrupted run sees,
  without restoring any data-loader or RNG state.
- Label dropout (classifier-free guidance training, Ho & Salimans 2022): with probability
  ``label_dropout`` the class token is replaced by the null token, so the one network also learns the
  unconditional distribution that guidance contrasts against.
- Validation: mean next-token loss over every code of the held-out split (true class labels, no dropout),
  summed over processes, reported in nats and in bits per token (nats / ln 2).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from stage1_tokenizer.checkpoints import CheckpointManager
from stage1_tokenizer.config import check_choice, check_positive, save_config

from .conditioning import AttributeClasses
from .prior import PRIOR_SIZES, ImageTokenPrior, build_prior
from .token_dataset import TokenGridDataset, check_same_tokenizer, load_token_dataset

logger = logging.getLogger(__name__)

PRIOR_FOLDER = "prior"
CHECKPOINTS_FOLDER = "checkpoints"
LOGS_FOLDER = "logs"
RESULT_FILE = "result.json"


@dataclass
class PriorTrainingConfig:
    """Everything that defines a prior training run. ``batch_size`` is per process; the effective batch is
    ``batch_size * num_processes * gradient_accumulation_steps`` grids."""

    # -- data ---------------------------------------------------------------------------------------
    token_dataset: str = "outputs/tokens"  # a folder written by scripts/tokenize_dataset.py
    train_split: str = "train"
    validation_split: str | None = "validation"  # None: no validation
    expected_tokenizer: str | None = None  # folder or Hub id; the tokens must have been made by it
    class_attributes: list[str] = field(default_factory=list)  # empty: unconditional (see conditioning.py)
    label_dropout: float = 0.1  # conditional priors: probability of the null token in training

    # -- model ----------------------------------------------------------------------------------------
    prior_size: str = "base"  # a key of PRIOR_SIZES; the fields below override its entries
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    init_from: str | None = None  # fine-tune this prior (its tokenizer must be the dataset's)

    # -- optimisation -----------------------------------------------------------------------------
    max_steps: int = 10_000  # optimizer updates
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    lr_warmup_steps: int = 500  # linear warm-up, then cosine decay to 0 at max_steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.05  # matrices and embeddings only; norms are not decayed
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware has it
    seed: int = 0

    # -- checkpointing, evaluation, logging -------------------------------------------------------
    output_dir: str = "outputs/prior"
    checkpoint_every: int = 1000
    keep_last: int = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    eval_every: int = 1000
    eval_batch_size: int = 64
    log_every: int = 10
    report_to: Literal["tensorboard", "none"] = "tensorboard"

    def __post_init__(self):
        check_choice("prior_size", self.prior_size, sorted(PRIOR_SIZES))
        check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        check_choice("report_to", self.report_to, ("tensorboard", "none"))
        check_positive(
            self,
            ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_steps", "batch_size",
             "gradient_accumulation_steps", "learning_rate", "max_grad_norm", "checkpoint_every", "keep_last",
             "eval_every", "eval_batch_size", "log_every"),
        )
        check_positive(self, ("lr_warmup_steps", "weight_decay"), allow_zero=True)
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout!r}")


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU that supports it or a CPU with native bf16 (AVX512-BF16 / AMX),
    else ``no``: emulated bf16 on an older CPU is slower than float32."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    # oneDNN's own test of the bf16 instructions; torch has no public equivalent for the CPU.
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def _seed(*parts: int) -> int:
    """An independent 63-bit seed for each tuple of integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class MicroBatches:
    """Rows of each micro-batch, as a pure function of the micro-step (see the module docstring).

    Args:
        num_rows: rows in the training split.
        batch_size: rows per process per micro-step.
        num_processes, process_index: the accelerate topology.
        seed: the run's seed.
    """

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.global_batch = batch_size * num_processes
        self.per_epoch = num_rows // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the training split has {num_rows} rows, fewer than one global batch ({batch_size} x "
                f"{num_processes} processes); lower batch_size or tokenize more images"
            )
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.process_index = process_index
        self.seed = seed
        self._epoch = -1
        self._order: Tensor | None = None

    def rows(self, micro_step: int) -> Tensor:
        epoch, k = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._order = torch.randperm(self.num_rows, generator=generator)
            self._epoch = epoch
        start = k * self.global_batch + self.process_index * self.batch_size
        return self._order[start : start + self.batch_size]


def _split_tensors(data: TokenGridDataset, split: str, classes: AttributeClasses) -> tuple[Tensor, Tensor]:
    """A split as in-memory tensors: codes ``long [N, h*w]`` and class ids ``long [N]`` (-1: none)."""
    table = data[split].with_format("numpy", columns=["tokens", "labels"])[:]
    tokens = torch.from_numpy(np.asarray(table["tokens"]).astype(np.int64))
    labels = torch.from_numpy(np.asarray(table["labels"]).astype(np.int64)).reshape(len(tokens), -1)
    return tokens, classes.class_ids(labels)


def _make_prior(cfg: PriorTrainingConfig, data: TokenGridDataset, classes: AttributeClasses) -> ImageTokenPrior:
    info = data.info
    if cfg.init_from is None:
        return build_prior(
            info.codebook_size,
            tuple(info.grid_size),
            classes.num_classes,
            size=cfg.prior_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            tokenizer_hash=info.tokenizer_hash,
            class_names=classes.class_names() if classes.num_classes else None,
        )
    prior = ImageTokenPrior.from_pretrained(cfg.init_from)
    check_same_tokenizer(prior.config.tokenizer_hash, info.tokenizer_hash, f"the prior {cfg.init_from!r}")
    mismatched = {
        name: (theirs, ours)
        for name, theirs, ours in (
            ("codebook_size", prior.codebook_size, info.codebook_size),
            ("grid_size", list(prior.grid_size), list(info.grid_size)),
            ("num_classes", prior.num_classes, classes.num_classes),
        )
        if theirs != ours
    }
    if mismatched:
        raise ValueError(
            f"the prior {cfg.init_from!r} does not fit this dataset and class choice: {mismatched} (prior, data)"
        )
    return prior


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices and embeddings (LlamaGen's rule: parameters with >= 2 dims); decaying RMSNorm gains
    # would pull them toward 0 and shrink every activation.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_prior(
    prior: ImageTokenPrior, tokens: Tensor, class_ids: Tensor, accelerator: Accelerator, batch_size: int
) -> dict[str, float]:
    """Mean next-token loss (nats) over every code of a split, and the same in bits per token.

    Rows are spread over processes (row ``i`` on process ``i mod P``); sums and counts are all-reduced, so
    every process returns the same exact mean whatever the number of processes. ``prior`` is the unwrapped
    model: the processes may run different numbers of batches, which a DDP forward must not see.
    """
    was_training = prior.training
    prior.eval()
    mine = torch.arange(accelerator.process_index, len(tokens), accelerator.num_processes)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        ids = prior.token_sequences(tokens[rows].to(accelerator.device), class_ids[rows].to(accelerator.device))
        logits = prior(input_ids=ids).logits
        # Position t predicts token t + 1: every target is a code, the conditioning token is never one.
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total[0] += nll.double()
        total[1] += ids[:, 1:].numel()
    total = accelerator.reduce(total, reduction="sum")
    prior.train(was_training)
    loss = float(total[0] / total[1].clamp_min(1))
    return {"loss": loss, "bits_per_token": loss / math.log(2)}


def _tracker_config(cfg: PriorTrainingConfig) -> dict:
    # TensorBoard's hparams accept only scalars and strings.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(cfg).items()}


def train_prior(cfg: PriorTrainingConfig) -> dict:
    """Train (or resume training) a prior; save it with ``save_pretrained`` to ``output_dir/prior``.

    ``output_dir`` also gets ``checkpoints/checkpoint-<step>``, ``logs/`` (TensorBoard),
    ``training_config.yaml`` and ``result.json``.

    Every process must call this (under ``accelerate launch`` or plain ``python``).

    Args:
        cfg: the run's :class:`PriorTrainingConfig`.

    Returns:
        ``{"step", "start_step", "losses" (mean train loss of each step run here, nats), "validation"
        ({"loss", "bits_per_token"} at the end, or None), "prior_path", "num_processes", "mixed_precision",
        "num_parameters"}``; also written to ``output_dir/result.json``.

    Raises:
        ValueError: tokens of another tokenizer (``expected_tokenizer``, ``init_from``, or the checkpoint being
            resumed), unknown class attributes, a split smaller than one batch.
        NonFiniteLossError: a NaN / inf loss; the newest checkpoint is the last good state.
    """
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Without cpu=True, accelerate 1.15 on a machine without a GPU ignores the launcher's WORLD_SIZE and
        # every process of `accelerate launch --multi_gpu --num_processes N` trains alone (checked); with it,
        # the processes join one gloo (MULTI_CPU) group.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_FOLDER)),
    )
    set_seed(cfg.seed)
    data = load_token_dataset(cfg.token_dataset, expected_tokenizer=cfg.expected_tokenizer)
    info = data.info
    classes = AttributeClasses.from_names(cfg.class_attributes, info.attribute_names, info.num_classes_per_attribute)
    train_tokens, train_classes = _split_tensors(data, cfg.train_split, classes)
    validation = _split_tensors(data, cfg.validation_split, classes) if cfg.validation_split else None

    prior = _make_prior(cfg, data, classes)
    prior.train()
    optimizer = torch.optim.AdamW(
        _parameter_groups(prior, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.lr_warmup_steps, cfg.max_steps)
    model, optimizer = accelerator.prepare(prior, optimizer)
    # Not prepared: a prepared scheduler steps once per process per update, which would stretch the
    # warm-up and the cosine over num_processes x fewer updates. Registered so checkpoints hold it.
    accelerator.register_for_checkpointing(scheduler)
    prior = accelerator.unwrap_model(model)

    manager = CheckpointManager(accelerator, output_dir / CHECKPOINTS_FOLDER, keep_last=cfg.keep_last)
    checkpoint = manager.resolve(cfg.resume_from_checkpoint)
    if checkpoint is not None:
        state = manager.read_state(checkpoint)
        check_same_tokenizer(
            state["metadata"].get("tokenizer_hash"), info.tokenizer_hash, f"the checkpoint {str(checkpoint)!r}"
        )
        if state["num_processes"] != accelerator.num_processes:
            logger.warning(
                "resuming a %d-process checkpoint with %d processes: batches differ from the uninterrupted run",
                state["num_processes"], accelerator.num_processes,
            )
    step = manager.resume(checkpoint)
    start_step = step
    batches = MicroBatches(
        len(train_tokens), cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed
    )

    if accelerator.is_main_process:
        save_config(cfg, output_dir / "training_config.yaml")
    if cfg.report_to == "tensorboard":
        accelerator.init_trackers("prior", config=_tracker_config(cfg))
    metadata = {"tokenizer_hash": info.tokenizer_hash}

    def validate() -> dict[str, float] | None:
        if validation is None:
            return None
        metrics = evaluate_prior(prior, *validation, accelerator, cfg.eval_batch_size)
        accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
        return metrics

    losses: list[float] = []
    metrics = None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="prior", disable=not accelerator.is_local_main_process)
    while step < cfg.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for accumulated in range(cfg.gradient_accumulation_steps):
            micro = step * cfg.gradient_accumulation_steps + accumulated
            rows = batches.rows(micro)
            labels = train_classes[rows]
            if classes.num_classes and cfg.label_dropout > 0:
                generator = torch.Generator().manual_seed(_seed(cfg.seed, micro, accelerator.process_index))
                dropped = torch.rand(len(rows), generator=generator) < cfg.label_dropout
                labels = torch.where(dropped, torch.full_like(labels, -1), labels)
            inputs = prior.lm_inputs(train_tokens[rows].to(accelerator.device), labels.to(accelerator.device))
            with accelerator.accumulate(model):
                loss = model(**inputs).loss  # prepare() wrapped the forward in the mixed-precision autocast
                manager.check_finite({"loss": loss.detach()}, step + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().float() / cfg.gradient_accumulation_steps
        scheduler.step()
        step += 1
        mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
        losses.append(mean_loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            lr = scheduler.get_last_lr()[0]
            accelerator.log(
                {"train/loss": mean_loss, "train/bits_per_token": mean_loss / math.log(2), "train/lr": lr}, step=step
            )
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics = validate()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            manager.save(step, metadata=metadata)
    bar.close()
    if metrics is None and step == start_step:  # resumed a finished run: report its validation anyway
        metrics = validate()

    prior_path = output_dir / PRIOR_FOLDER
    result = {
        "step": step,
        "start_step": start_step,
        "losses": losses,
        "validation": metrics,
        "prior_path": str(prior_path),
        "num_processes": accelerator.num_processes,
        "mixed_precision": mixed_precision,
        "num_parameters": sum(p.numel() for p in prior.parameters()),
    }
    if accelerator.is_main_process:
        prior.save_pretrained(prior_path)
        (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
