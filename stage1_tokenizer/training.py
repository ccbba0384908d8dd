"""Stage-one training: the tokenizer (and, for VQGAN, its discriminator) under ``accelerate``.

One loop for every quantizer and both setups of the paper (conv VQ-VAE with MSE only; VQGAN with LPIPS and
a PatchGAN). Run it with ``accelerate launch scripts/train_tokenizer.py --config ...`` on any number of
processes, or call :func:`train_tokenizer` directly.

Resume is exact: a checkpoint holds models, optimizers, LR schedulers, every process's RNG states (via
``accelerator.save_state``), the EMA weights and the codebook-usage counts; the data order of epoch ``e``
is a function of ``(data_seed, e)`` (accelerate's seedable sampler), the batches of the interrupted epoch
that were already used are skipped without being loaded (``accelerator.skip_first_batches``), and random
flips are a function of the data position (:func:`random_flip`). A run of N steps and the same run killed
at step k and resumed log the same numbers and end with the same weights, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torchvision.utils
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import model_card
from .checkpoints import CheckpointManager
from .config import TokenizerTrainingConfig, save_config
from .data import load_image_dataset
from .losses import VQGANLoss
from .model import VQTokenizer
from .quantizers.usage import CodebookUsage

RESULT_FILE = "train_result.json"
# Codes replayed at once when restoring the usage histogram (bounds the memory of the replay).
_USAGE_RESTORE_CODES = 256


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TokenizerTrainingConfig, steps_per_epoch: int, total_steps: int
) -> LambdaLR:
    """The LR schedule of ``cfg.lr_schedule``, counted in updates of ``optimizer``, with linear warm-up.

    ``constant`` and ``cosine`` (to 0 at ``total_steps``) are diffusers' schedules; ``exponential``
    multiplies the LR by ``lr_decay_rate`` every ``lr_decay_steps`` updates (default: one epoch, the
    paper's 0.995 per epoch), smoothly in between.
    """
    if cfg.lr_schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    if cfg.lr_schedule == "cosine":
        return get_scheduler(
            "cosine", optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps
        )
    decay_steps = cfg.lr_decay_steps or steps_per_epoch
    warmup = cfg.lr_warmup_steps

    def exponential(step: int) -> float:
        ramp = min(1.0, step / warmup) if warmup else 1.0
        return ramp * cfg.lr_decay_rate ** (max(0, step - warmup) / decay_steps)

    return LambdaLR(optimizer, exponential)


def build_loss(cfg: TokenizerTrainingConfig) -> VQGANLoss:
    """The training loss (pixel, LPIPS, quantizer and GAN terms, with their weights) that ``cfg`` names."""
    return VQGANLoss(
        pixel_loss=cfg.pixel_loss, pixel_weight=cfg.pixel_weight, perceptual_weight=cfg.perceptual_weight,
        quantizer_weight=cfg.quantizer_weight, gan_weight=cfg.gan_weight, gan_start_step=cfg.disc_start_step,
        discriminator_channels=cfg.disc_channels, discriminator_layers=cfg.disc_layers,
    )


@contextmanager
def discriminator_view(loss: VQGANLoss, discriminator: nn.Module, trainable: bool):
    """Let ``loss`` use ``discriminator`` (bare or DDP-wrapped), with trainable or frozen parameters.

    The generator's step runs the bare module with frozen parameters: its adversarial gradient must reach
    the reconstruction but neither add to the discriminator's accumulated gradients nor start a DDP
    reduction for it. The discriminator's own step runs the wrapped module (gradients all-reduced).
    """
    bare = loss.discriminator
    loss.discriminator = discriminator
    bare.requires_grad_(trainable)
    try:
        yield
    finally:
        loss.discriminator = bare
        bare.requires_grad_(True)


def random_flip(images: Tensor, seed: int, epoch: int, batch_index: int, process_index: int) -> Tensor:
    """Flip each image horizontally with probability 1/2, drawn from ``(seed, epoch, batch, process)``.

    Done here rather than in the dataset: accelerate's loader fetches one batch ahead, so a flip drawn from
    the global RNG inside the dataset would already be in the RNG state a checkpoint saves, and a resumed
    run would draw it again for the wrong batch. A flip that is a function of the data position is
    reproduced exactly.
    """
    key = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(2)
    generator = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def reconstruction_grid(tokenizer: VQTokenizer, images: Tensor) -> Tensor:
    """Originals (top row) over eval-mode reconstructions (bottom row), as a ``[3, H', W']`` image in [0, 1]."""
    was_training = tokenizer.training
    tokenizer.eval()
    with torch.no_grad():
        images = images.to(tokenizer.device)
        reconstruction = tokenizer(images).reconstruction.float().clamp(-1, 1)
    tokenizer.train(was_training)
    both = torch.cat([images.float(), reconstruction]).cpu()
    return torchvision.utils.make_grid((both + 1) / 2, nrow=images.shape[0], padding=2)


def restore_usage(usage: CodebookUsage, counts: Tensor) -> None:
    """Put a saved code histogram back into a tracker by replaying it through ``update``."""
    usage.reset()
    for start in range(0, counts.numel(), _USAGE_RESTORE_CODES):
        block = counts[start : start + _USAGE_RESTORE_CODES].long()
        codes = torch.arange(start, start + block.numel())
        usage.update(torch.repeat_interleave(codes, block))


def _tracker_config(cfg: TokenizerTrainingConfig) -> dict:
    """TensorBoard hparams take only numbers, strings and booleans."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in dataclasses.asdict(cfg).items()
    }


def _ema_state(ema: EMAModel) -> tuple[dict[str, Tensor], dict]:
    state = ema.state_dict()
    tensors = {f"ema.{i}": t for i, t in enumerate(state.pop("shadow_params"))}
    return tensors, state


def _load_ema_state(ema: EMAModel, tensors: dict[str, Tensor], metadata: dict) -> None:
    shadow = [tensors[f"ema.{i}"] for i in range(len(ema.shadow_params))]
    ema.load_state_dict({**metadata, "shadow_params": shadow})


def train_tokenizer(cfg: TokenizerTrainingConfig) -> dict:
    """Train a tokenizer as ``cfg`` says; save checkpoints, logs, samples and the final tokenizer.

    Writes under ``cfg.output_dir``: ``config.yaml``, ``checkpoints/checkpoint-<step>/``, ``logs/``
    (TensorBoard), ``samples/step-<step>.png``, ``tokenizer/`` (``save_pretrained`` + model card; the EMA
    weights when ``use_ema``), ``tokenizer-inference/`` (SimVQ / TransVQ: the codebook as a plain table),
    and ``train_result.json``.

    Returns:
        ``{"num_processes", "start_step", "steps", "epoch", "steps_per_second", "history" (one record per
        logged step), "usage" (CodebookUsage.summary() of the current epoch, merged over processes),
        "tokens_per_process", "tokenizer_dir", "inference_dir", "last_checkpoint"}``.

    Raises:
        NonFiniteLossError: a loss became NaN or inf; the newest checkpoint is the last good state.
    """
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Without an accelerator, accelerate forms a multi-process (gloo) group only when told cpu=True;
        # otherwise `accelerate launch --multi_gpu --num_processes 2` runs two unconnected single processes.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Epoch e's order depends only on (data_seed, e): what makes skipping to a mid-epoch position exact.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.data_seed),
        # The LR schedulers count optimizer updates; we step them once per update ourselves.
        step_scheduler_with_optimizer=False,
    )
    set_seed(cfg.seed)  # the same initial weights on every process
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")

    # -- data ---------------------------------------------------------------------------------------
    with accelerator.main_process_first():  # synthetic faces are rendered and cached once, by process 0
        dataset = load_image_dataset(
            cfg.dataset, split=cfg.dataset_split, image_size=cfg.image_size, num_images=cfg.num_images,
            seed=cfg.data_seed, random_flip=False, cache_dir=cfg.cache_dir,  # flips: see random_flip()
        )
    if len(dataset) < cfg.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(dataset)} training images are fewer than one batch on every process "
            f"({cfg.batch_size} x {accelerator.num_processes}); use more images or a smaller batch_size"
        )
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.dataloader_num_workers,
        # A generator of its own, so that creating an epoch's iterator draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(cfg.data_seed),
    )
    grid_images = torch.stack(
        [dataset[i]["pixel_values"] for i in range(min(cfg.num_grid_images, len(dataset)))]
    ) if cfg.num_grid_images else None

    # -- models, optimizers, schedules --------------------------------------------------------------
    tokenizer = VQTokenizer(**cfg.tokenizer_kwargs())
    loss = build_loss(cfg).to(accelerator.device)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    trainable = [p for p in tokenizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)
    tokenizer, optimizer, loader = accelerator.prepare(tokenizer, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    scheduler = accelerator.prepare(build_lr_scheduler(optimizer.optimizer, cfg, steps_per_epoch, cfg.max_steps))
    models = [tokenizer]
    discriminator = disc_optimizer = disc_scheduler = None
    if loss.discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            loss.discriminator.parameters(), lr=cfg.disc_learning_rate or cfg.learning_rate, betas=betas,
            weight_decay=cfg.weight_decay,
        )
        discriminator, disc_optimizer = accelerator.prepare(loss.discriminator, disc_optimizer)
        # The discriminator's schedule counts its own updates, from disc_start_step on.
        disc_total = max(1, cfg.max_steps - cfg.disc_start_step)
        disc_scheduler = accelerator.prepare(
            build_lr_scheduler(disc_optimizer.optimizer, cfg, steps_per_epoch, disc_total)
        )
        models.append(discriminator)
    bare_tokenizer = accelerator.unwrap_model(tokenizer)
    ema = EMAModel(trainable, decay=cfg.ema_decay) if cfg.use_ema else None
    usage = CodebookUsage(cfg.codebook_size)

    set_seed(cfg.seed, device_specific=True)  # from here on, every process has an RNG stream of its own

    # -- resume (restores every process's RNG stream as well) ----------------------------------------
    manager = CheckpointManager(accelerator, output_dir / "checkpoints", keep_last=cfg.keep_last)
    resumed_from = manager.resolve(cfg.resume_from_checkpoint)
    start_step = manager.resume(resumed_from)
    epoch, steps_into_epoch = divmod(start_step, steps_per_epoch)
    batches_to_skip = steps_into_epoch * cfg.gradient_accumulation_steps
    if resumed_from is not None:
        tensors, metadata = manager.read_tensors(resumed_from), manager.read_state(resumed_from)["metadata"]
        if ema is not None:
            _load_ema_state(ema, tensors, metadata["ema"])
        # Usage counts belong to their epoch (a checkpoint at an epoch's last step holds the finished
        # epoch's). Merged counts go to one process only, or the next sync would multiply them.
        if metadata["epoch"] == epoch and accelerator.is_main_process:
            restore_usage(usage, tensors["usage_counts"])
    if cfg.report_to == "tensorboard":
        accelerator.init_trackers("tokenizer", config=_tracker_config(cfg))

    def save_checkpoint(step: int) -> Path:
        usage.sync()
        tensors = {"usage_counts": usage.counts}
        metadata = {"epoch": epoch}
        if ema is not None:
            ema_tensors, metadata["ema"] = _ema_state(ema)
            tensors.update(ema_tensors)
        return manager.save(step, tensors=tensors, metadata=metadata)

    # -- the loop -----------------------------------------------------------------------------------
    history: list[dict] = []
    step_sums: dict[str, Tensor] = {}
    micro_batches = 0  # in this update: gradient_accumulation_steps, fewer at the end of an epoch
    tokens_per_process = 0
    grad_norm = None  # before clipping, of the last update (identical on every process)
    global_step = start_step
    last_saved = start_step if resumed_from is not None else None
    progress = tqdm(total=cfg.max_steps, initial=start_step, desc="tokenizer",
                    disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    tokenizer.train()
    while global_step < cfg.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batches_to_skip) if batches_to_skip else loader
        for batch_index, batch in enumerate(batches, start=batches_to_skip):
            images = batch["pixel_values"]
            if cfg.random_flip:
                images = random_flip(images, cfg.seed, epoch, batch_index, accelerator.process_index)
            with accelerator.accumulate(*models):
                bare_tokenizer.set_step(global_step)
                output = tokenizer(images)
                usage.update(output.indices)
                tokens_per_process += output.indices.numel()
                frozen = (
                    discriminator_view(loss, loss.discriminator, trainable=False)
                    if discriminator is not None else nullcontext()
                )
                with accelerator.autocast(), frozen:
                    generator_loss, logs = loss.generator_loss(
                        images, output.reconstruction, output.quantizer_loss, global_step,
                        last_layer_weight=bare_tokenizer.last_layer_weight,
                    )
                disc_loss = None
                if loss.gan_active(global_step):
                    with accelerator.autocast(), discriminator_view(loss, discriminator, trainable=True):
                        disc_loss, disc_logs = loss.discriminator_loss(images, output.reconstruction, global_step)
                    logs.update(disc_logs)
                # Before any update: a NaN step is never applied, so the newest checkpoint stays good.
                manager.check_finite(logs, global_step + 1)

                accelerator.backward(generator_loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
                if disc_loss is not None:
                    accelerator.backward(disc_loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(discriminator.parameters(), cfg.max_grad_norm)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad()
            logged = {f"loss/{name}": value for name, value in logs.items()}
            logged["usage/batch_perplexity"] = output.perplexity
            for name, value in logged.items():
                step_sums[name] = step_sums.get(name, 0.0) + value.detach().float()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            # -- one optimizer update done -------------------------------------------------------------
            scheduler.step()
            if disc_loss is not None:
                disc_scheduler.step()
            if ema is not None:
                ema.step(trainable)
            global_step += 1
            progress.update(1)
            if global_step % cfg.log_every == 0 or global_step == cfg.max_steps:
                record = _log_record(accelerator, step_sums, micro_batches, usage, bare_tokenizer, scheduler,
                                     global_step, epoch)
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                accelerator.log(record, step=global_step)
                history.append(record)
                progress.set_postfix(loss=f"{record['loss/total']:.4f}",
                                     util=f"{record['usage/utilisation']:.2f}")
            step_sums, micro_batches = {}, 0
            if grid_images is not None and global_step % cfg.image_every == 0 and accelerator.is_main_process:
                grid = reconstruction_grid(bare_tokenizer, grid_images)
                (output_dir / "samples").mkdir(parents=True, exist_ok=True)
                torchvision.utils.save_image(grid, output_dir / "samples" / f"step-{global_step:07d}.png")
                if cfg.report_to == "tensorboard":
                    accelerator.get_tracker("tensorboard", unwrap=True).add_image(
                        "reconstructions", grid, global_step
                    )
            if global_step % cfg.checkpoint_every == 0:
                save_checkpoint(global_step)
                last_saved = global_step
            if global_step >= cfg.max_steps:
                break
        else:  # the epoch ran to its end
            batches_to_skip = 0
            usage.sync()
            accelerator.log({"usage/epoch_utilisation": usage.utilisation(),
                             "usage/epoch_dead_codes": usage.dead_codes()}, step=global_step)
            usage.reset()
            epoch += 1
    elapsed = time.perf_counter() - started
    progress.close()

    if last_saved != global_step:
        save_checkpoint(global_step)
    usage.sync()
    result = {
        "num_processes": accelerator.num_processes,
        "start_step": start_step,
        "steps": global_step,
        "epoch": epoch,
        "steps_per_second": (global_step - start_step) / elapsed if elapsed > 0 else None,
        "history": history,
        "usage": usage.summary(),
        "tokens_per_process": tokens_per_process,
        "tokenizer_dir": str(output_dir / "tokenizer"),
        "inference_dir": None,
        "last_checkpoint": str(manager.latest()),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trainable)  # training is over: publish the averaged weights
        bare_tokenizer.eval()
        card = {"usage": result["usage"], "datasets": [cfg.dataset]}
        model_card.save_tokenizer_folder(bare_tokenizer, output_dir / "tokenizer", export=False, **card)
        if hasattr(bare_tokenizer.quantize, "export_codebook"):
            inference_dir = output_dir / "tokenizer-inference"
            model_card.save_tokenizer_folder(bare_tokenizer, inference_dir, export=True, **card)
            result["inference_dir"] = str(inference_dir)
        (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _log_record(accelerator: Accelerator, step_sums: dict[str, Tensor], micro_batches: int,
                usage: CodebookUsage, tokenizer: VQTokenizer, scheduler, step: int, epoch: int) -> dict:
    """Mean of this update's micro-batch logs over processes, plus LR, usage and the quantizer's tau."""
    names = sorted(step_sums)
    values = torch.stack([step_sums[name] for name in names]).to(accelerator.device) / micro_batches
    values = accelerator.reduce(values, reduction="mean").tolist()
    usage.sync()
    summary = usage.summary()
    record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
    record.update(zip(names, values))
    record.update({f"usage/{key}": summary[key] for key in ("utilisation", "perplexity", "dead_codes")})
    tau = getattr(tokenizer.quantize, "current_tau", None)
    if tau is not None:
        record["tau"] = float(tau)
    return record
