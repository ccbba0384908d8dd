"""Evaluate a trained tokenizer: rFID, LPIPS, SSIM, PSNR and codebook usage over a whole split.

Writes ``metrics.json`` (numbers + the recipe that reproduces them), ``metrics.md`` (a table),
``reconstructions.png`` (inputs above their reconstructions) and ``code_usage.png`` (code-hit histogram).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .data import load_image_dataset, save_image_grid  # noqa: E402
from .metrics import ReconstructionMetrics  # noqa: E402
from .model import VQTokenizer  # noqa: E402
from .quantizers.usage import CodebookUsage  # noqa: E402


@dataclass
class EvaluationDataConfig:
    """The images and metric settings of an evaluation. ``num_images=None`` takes the whole split."""

    dataset: str = "synthetic-faces"
    split: str = "test"
    image_size: int = 64
    num_images: int | None = None  # images of the split to use; None: all
    dataset_num_images: int | None = None  # size of the whole source (load_image_dataset's num_images)
    data_seed: int = 0
    batch_size: int = 32
    lpips_net: str = "alex"  # the paper reports LPIPS with AlexNet
    device: str = "cpu"
    grid_images: int = 8
    cache_dir: str | None = None

    def __post_init__(self):
        if self.lpips_net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', got {self.lpips_net!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_images is not None and self.num_images < 2:
            raise ValueError(f"num_images must be >= 2 (FID needs two images per side), got {self.num_images}")

    def load_dataset(self) -> torch.utils.data.Dataset:
        return load_image_dataset(
            self.dataset, split=self.split, image_size=self.image_size, num_images=self.dataset_num_images,
            seed=self.data_seed, cache_dir=self.cache_dir,
        )

    def recipe(self, num_images: int, metrics: ReconstructionMetrics) -> dict[str, Any]:
        """What reproduces the numbers: the images, their resize path and every metric's settings."""
        return {
            "dataset": self.dataset, "split": self.split, "num_images": num_images,
            "dataset_num_images": self.dataset_num_images, "image_size": self.image_size,
            "resize": "shorter side to image_size (bilinear, antialias), centre crop",
            "data_seed": self.data_seed, **metrics.recipe(),
        }


@dataclass
class TokenizerEvaluationConfig(EvaluationDataConfig):
    """One tokenizer on one split (scripts/evaluate_tokenizer.py)."""

    tokenizer: str = "outputs/tokenizer/tokenizer"  # a folder or Hub id (VQTokenizer.from_pretrained)
    output_dir: str = "outputs/tokenizer/eval"


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: VQTokenizer,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 32,
    num_images: int | None = None,
    device: str | torch.device = "cpu",
    lpips_net: str = "alex",
    metrics: ReconstructionMetrics | None = None,
    fid_real: bool = True,
    grid_images: int = 8,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Reconstruct ``num_images`` images of ``dataset`` and measure them.

    ``fid_real=False``: ``metrics`` already holds the Inception statistics of these real images (see
    :func:`compare_tokenizers`), so only the reconstructions go through Inception.

    Returns:
        ``(results, counts, grid)``: results holds rfid, lpips, ssim, psnr, utilisation, perplexity,
        dead_codes, num_images and images_per_second; counts is the ``[K]`` code-hit histogram; grid is
        ``[2 * n, 3, H, W]`` (the first n = min(grid_images, images) inputs, then their reconstructions).
    """
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    if total < 2:
        raise ValueError(f"need at least 2 images to evaluate, the dataset has {len(dataset)}")
    subset = torch.utils.data.Subset(dataset, range(total))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    tokenizer = tokenizer.to(device).eval()
    metrics = metrics or ReconstructionMetrics(device, lpips_net=lpips_net)
    usage = CodebookUsage(tokenizer.config.codebook_size)
    inputs, recons = [], []  # the first grid_images pairs, for a picture
    start = time.perf_counter()
    for batch in tqdm(loader, desc="evaluating tokenizer", unit="batch"):
        images = batch["pixel_values"].to(device)
        out = tokenizer(images)
        recon = out.reconstruction.float().clamp(-1, 1)
        metrics.update(images, recon, fid_real=fid_real)
        usage.update(out.indices)
        missing = grid_images - sum(len(part) for part in inputs)
        if missing > 0:
            inputs.append(images[:missing].cpu())
            recons.append(recon[:missing].cpu())
    elapsed = time.perf_counter() - start
    usage.sync()
    results = {**metrics.compute(), **usage.summary(), "num_images": total, "images_per_second": total / elapsed}
    grid = torch.cat([*inputs, *recons])
    return results, usage.counts.cpu(), grid


def _ranked_hits(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Code-hit counts sorted from most to least used, and how many codes were hit at all."""
    counts = counts.double().sort(descending=True).values
    return counts, int((counts > 0).sum())


def plot_code_usage(counts: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Bar plot of code-hit counts sorted from most to least used (dead codes show as the zero tail)."""
    counts, used = _ranked_hits(counts)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(counts)), counts.numpy(), width=1.0, color="#3b6ea5")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("hits")
    ax.set_title(f"{title} {used}/{len(counts)} codes used".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METRIC_COLUMNS = ("utilisation", "dead_codes", "perplexity", "rfid", "lpips", "ssim", "psnr")


def metrics_table(rows: dict[str, dict[str, Any]], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """Markdown table, one row per named result dict (``-`` where a row lacks a column)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = []
        for column in columns:
            value = values.get(column)
            cells.append("-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluation(cfg: TokenizerEvaluationConfig, tokenizer: VQTokenizer | None = None) -> dict[str, Any]:
    """Load the tokenizer and split named in ``cfg``, evaluate, write the files, return the JSON dict."""
    tokenizer = tokenizer if tokenizer is not None else VQTokenizer.from_pretrained(cfg.tokenizer)
    dataset = cfg.load_dataset()
    metrics = ReconstructionMetrics(cfg.device, lpips_net=cfg.lpips_net)
    results, counts, grid = evaluate_tokenizer(
        tokenizer, dataset, batch_size=cfg.batch_size, num_images=cfg.num_images, device=cfg.device, metrics=metrics,
        grid_images=cfg.grid_images,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid, out / "reconstructions.png", nrow=grid.shape[0] // 2)
    plot_code_usage(counts, out / "code_usage.png", title=str(tokenizer.config.quantizer))
    record = {
        "metrics": results,
        "tokenizer": {"source": cfg.tokenizer, "quantizer": tokenizer.config.quantizer,
                      "codebook_size": tokenizer.config.codebook_size},
        "recipe": cfg.recipe(results["num_images"], metrics),
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "metrics.md").write_text(metrics_table({str(tokenizer.config.quantizer): results}))
    return record


# -- several tokenizers on one reference set (the paper's comparison) -----------------------------------------


@dataclass
class TokenizerComparisonConfig(EvaluationDataConfig):
    """Several tokenizers on the same images (scripts/compare_tokenizers.py).

    ``runs`` are training output folders (holding ``tokenizer/`` and ``train_result.json``, whose training
    speed then enters the table) or tokenizer folders. Rows are named by ``names``, else by quantizer.
    """

    runs: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    reference: str = "vq"  # the row whose training time per step is 1.0
    output_dir: str = "outputs/comparison"

    def __post_init__(self):
        super().__post_init__()
        if not self.runs:
            raise ValueError("runs is empty; pass --runs with training output folders or tokenizer folders")
        if self.names and len(self.names) != len(self.runs):
            raise ValueError(f"{len(self.names)} names for {len(self.runs)} runs; pass one name per run or none")


def resolve_run(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """``(tokenizer folder, train_result.json as a dict or None)`` of a training output or tokenizer folder."""
    path = Path(path)
    if (path / "tokenizer" / "config.json").is_file():
        result_file = path / "train_result.json"
        return path / "tokenizer", json.loads(result_file.read_text()) if result_file.is_file() else None
    if (path / "config.json").is_file():
        return path, None
    raise ValueError(
        f"{str(path)!r} is neither a training output folder (with tokenizer/config.json) nor a tokenizer "
        "folder (with config.json); pass the --output_dir of scripts/train_tokenizer.py or its tokenizer/"
    )


@torch.no_grad()
def compare_tokenizers(
    tokenizers: dict[str, VQTokenizer],
    dataset: torch.utils.data.Dataset,
    batch_size: int = 32,
    num_images: int | None = None,
    device: str | torch.device = "cpu",
    lpips_net: str = "alex",
    metrics: ReconstructionMetrics | None = None,
    grid_images: int = 8,
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor], torch.Tensor]:
    """:func:`evaluate_tokenizer` for each tokenizer on the same images, the real images' Inception
    statistics computed once and shared (every rFID is against the identical reference).

    Returns:
        ``(results, counts, grid)``: per name the metrics dict and the code-hit histogram; grid is
        ``[(1 + M) * n, 3, H, W]``: n = min(grid_images, images) inputs, then each tokenizer's n
        reconstructions, in order.
    """
    if not tokenizers:
        raise ValueError("no tokenizers to compare")
    metrics = metrics or ReconstructionMetrics(device, lpips_net=lpips_net, keep_real_fid=True)
    if metrics.fid is None or not metrics.fid.keep_real:
        raise ValueError("compare_tokenizers needs ReconstructionMetrics(..., keep_real_fid=True)")
    results, counts, rows = {}, {}, []
    for position, (name, tokenizer) in enumerate(tokenizers.items()):
        metrics.reset()  # keeps the real Inception statistics
        results[name], counts[name], grid = evaluate_tokenizer(
            tokenizer, dataset, batch_size=batch_size, num_images=num_images, device=device, metrics=metrics,
            fid_real=position == 0, grid_images=grid_images,
        )
        half = grid.shape[0] // 2
        if position == 0:
            rows.append(grid[:half])
        rows.append(grid[half:])
    return results, counts, torch.cat(rows)


def plot_usage_curves(counts: dict[str, torch.Tensor], path: str | Path) -> None:
    """Code-hit counts sorted from most to least used, one line per tokenizer, on one log-scale plot."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, hits in counts.items():
        hits, used = _ranked_hits(hits)
        ax.plot(range(1, len(hits) + 1), hits.numpy(), label=f"{name} ({used}/{len(hits)})")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("hits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curve(run: str | Path, tag: str = "usage/epoch_utilisation") -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one scalar that a training run logged to TensorBoard (``<run>/logs``),
    merged over every event file (a resumed run writes several; the newest value of a step wins).
    Empty when the run has no logs or never logged ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, tuple[float, float]] = {}  # step -> (wall time, value)
    for events in sorted(Path(run, "logs").glob("**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag not in accumulator.Tags()["scalars"]:
            continue
        for event in accumulator.Scalars(tag):
            if event.step not in values or event.wall_time >= values[event.step][0]:
                values[event.step] = (event.wall_time, event.value)
    return [(step, values[step][1]) for step in sorted(values)]


def plot_training_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path,
                         ylabel: str = "codebook utilisation per epoch") -> None:
    """One line per run (skipping runs without points), step on the x axis."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_comparison(cfg: TokenizerComparisonConfig) -> dict[str, Any]:
    """Load every run of ``cfg``, compare them on one split, write comparison.{json,md}, reconstructions.png
    (inputs, then one row per tokenizer), code_usage.png and, for training runs that logged it,
    usage_during_training.png (utilisation of every epoch); return the JSON dict."""
    tokenizers, training = {}, {}
    for position, run in enumerate(cfg.runs):
        folder, train_result = resolve_run(run)
        tokenizer = VQTokenizer.from_pretrained(folder)
        name = cfg.names[position] if cfg.names else str(tokenizer.config.quantizer)
        if name in tokenizers:
            raise ValueError(f"two runs are named {name!r}; pass --names with one distinct name per run")
        tokenizers[name] = tokenizer
        training[name] = {"source": str(run), "quantizer": tokenizer.config.quantizer,
                          "codebook_size": tokenizer.config.codebook_size}
        training[name]["epoch_utilisation"] = training_curve(run) if train_result is not None else []
        if train_result is not None and train_result.get("steps_per_second"):
            training[name]["steps"] = train_result["steps"]
            training[name]["seconds_per_step"] = 1.0 / train_result["steps_per_second"]
    dataset = cfg.load_dataset()
    metrics = ReconstructionMetrics(cfg.device, lpips_net=cfg.lpips_net, keep_real_fid=True)
    results, counts, grid = compare_tokenizers(
        tokenizers, dataset, batch_size=cfg.batch_size, num_images=cfg.num_images, device=cfg.device,
        metrics=metrics, grid_images=cfg.grid_images,
    )
    reference = training.get(cfg.reference, {}).get("seconds_per_step")
    for name, info in training.items():
        results[name]["train_seconds_per_step"] = info.get("seconds_per_step")
        if reference and info.get("seconds_per_step"):
            results[name]["train_time_vs_" + cfg.reference] = info["seconds_per_step"] / reference

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid, out / "reconstructions.png", nrow=grid.shape[0] // (len(tokenizers) + 1))
    plot_usage_curves(counts, out / "code_usage.png")
    curves = {name: info["epoch_utilisation"] for name, info in training.items()}
    if any(curves.values()):
        plot_training_curves(curves, out / "usage_during_training.png")
    recipe = cfg.recipe(next(iter(results.values()))["num_images"], metrics)
    recipe["rfid"]["reference"] = "the real images' Inception statistics, computed once, shared by every row"
    record = {"metrics": results, "tokenizers": training, "recipe": recipe,
              "grid_rows": ["input", *tokenizers]}
    (out / "comparison.json").write_text(json.dumps(record, indent=2, default=str))
    columns = [*METRIC_COLUMNS, "train_seconds_per_step", "train_time_vs_" + cfg.reference]
    (out / "comparison.md").write_text(metrics_table(results, columns))
    return record
