"""Evaluate a trained tokenizer: rFID, LPIPS, SSIM, PSNR and codebook usage over a whole split.

Writes ``metrics.json`` (numbers + the recipe that reproduces them), ``metrics.md`` (a table),
``reconstructions.png`` (inputs above their reconstructions) and ``code_usage.png`` (code-hit histogram).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
class TokenizerEvaluationConfig:
    """What to evaluate on. ``num_images=None`` takes the whole split."""

    tokenizer: str = "outputs/tokenizer/tokenizer"  # a folder or Hub id (VQTokenizer.from_pretrained)
    dataset: str = "synthetic-faces"
    split: str = "test"
    image_size: int = 64
    num_images: int | None = None  # images of the split to use; None: all
    dataset_num_images: int | None = None  # size of the whole source (load_image_dataset's num_images)
    data_seed: int = 0
    batch_size: int = 32
    lpips_net: str = "alex"  # the paper reports LPIPS with AlexNet
    device: str = "cpu"
    output_dir: str = "outputs/tokenizer/eval"
    grid_images: int = 8
    cache_dir: str | None = None

    def __post_init__(self):
        if self.lpips_net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', got {self.lpips_net!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_images is not None and self.num_images < 2:
            raise ValueError(f"num_images must be >= 2 (FID needs two images per side), got {self.num_images}")


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: VQTokenizer,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 32,
    num_images: int | None = None,
    device: str | torch.device = "cpu",
    lpips_net: str = "alex",
    metrics: ReconstructionMetrics | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Reconstruct ``num_images`` images of ``dataset`` and measure them.

    Returns:
        ``(results, counts, grid)``: results holds rfid, lpips, ssim, psnr, utilisation, perplexity,
        dead_codes, num_images and images_per_second; counts is the ``[K]`` code-hit histogram; grid is
        ``[2 * n, 3, H, W]`` (first n inputs, then their reconstructions) for a picture.
    """
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    if total < 2:
        raise ValueError(f"need at least 2 images to evaluate, the dataset has {len(dataset)}")
    subset = torch.utils.data.Subset(dataset, range(total))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    tokenizer = tokenizer.to(device).eval()
    metrics = metrics or ReconstructionMetrics(device, lpips_net=lpips_net)
    usage = CodebookUsage(tokenizer.config.codebook_size)
    first_inputs = first_recons = None
    start = time.perf_counter()
    for batch in tqdm(loader, desc="evaluating tokenizer", unit="batch"):
        images = batch["pixel_values"].to(device)
        out = tokenizer(images)
        recon = out.reconstruction.float().clamp(-1, 1)
        metrics.update(images, recon)
        usage.update(out.indices)
        if first_inputs is None:
            first_inputs, first_recons = images[:8].cpu(), recon[:8].cpu()
    elapsed = time.perf_counter() - start
    usage.sync()
    results = {**metrics.compute(), **usage.summary(), "num_images": total, "images_per_second": total / elapsed}
    grid = torch.cat([first_inputs, first_recons])
    return results, usage.counts.cpu(), grid


def plot_code_usage(counts: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Bar plot of code-hit counts sorted from most to least used (dead codes show as the zero tail)."""
    counts = counts.double().sort(descending=True).values
    used = int((counts > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(counts)), counts.numpy(), width=1.0, color="#3b6ea5")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("hits")
    ax.set_title(f"{title} {used}/{len(counts)} codes used".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per named result dict."""
    columns = ["utilisation", "dead_codes", "perplexity", "rfid", "lpips", "ssim", "psnr"]
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
    dataset = load_image_dataset(
        cfg.dataset, split=cfg.split, image_size=cfg.image_size, num_images=cfg.dataset_num_images,
        seed=cfg.data_seed, cache_dir=cfg.cache_dir,
    )
    metrics = ReconstructionMetrics(cfg.device, lpips_net=cfg.lpips_net)
    results, counts, grid = evaluate_tokenizer(
        tokenizer, dataset, batch_size=cfg.batch_size, num_images=cfg.num_images, device=cfg.device, metrics=metrics
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = min(cfg.grid_images, grid.shape[0] // 2)
    save_image_grid(torch.cat([grid[:n], grid[grid.shape[0] // 2 : grid.shape[0] // 2 + n]]), out / "reconstructions.png", nrow=n)
    plot_code_usage(counts, out / "code_usage.png", title=str(tokenizer.config.quantizer))
    record = {
        "metrics": results,
        "tokenizer": {"source": cfg.tokenizer, "quantizer": tokenizer.config.quantizer,
                      "codebook_size": tokenizer.config.codebook_size},
        "recipe": {
            "dataset": cfg.dataset, "split": cfg.split, "num_images": results["num_images"],
            "image_size": cfg.image_size, "resize": "shorter side to image_size (bilinear, antialias), centre crop",
            "data_seed": cfg.data_seed, **metrics.recipe(),
        },
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "metrics.md").write_text(metrics_table({str(tokenizer.config.quantizer): results}))
    return record
