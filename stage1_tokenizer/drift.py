"""The drift benchmark (the paper's Fig. 1 story): codebooks learn while their latents move.

A quantizer that only updates the codes it selects loses every code the moving latent distribution leaves
behind (METHOD.md, "The claim"). This module makes latent streams that move while the codebook learns,
trains every registered quantizer on them with the same steps and optimizer, and measures what is left:
utilisation over the last steps and the quantisation error on the final distribution, relative to
k-means on that distribution (the error a codebook could reach if none of its codes had died).

Streams:
    translation      Gaussian cloud whose mean moves along a straight path.
    translation_x4   the same, every latent four times larger (does a method's kernel fit the scale?).
    shrinking        Gaussian cloud at the origin whose scale decays exponentially.
    autoencoder      latents of a small MLP encoder trained jointly with a decoder and the quantizer on
                     a toy reconstruction task: the drift is the encoder's own.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .quantizers import QUANTIZERS, Quantizer, build_quantizer
from .quantizers.base import nearest_codes

NSVQ_TAUS = (0.25, 1.0, 4.0, 16.0)


# -- latent streams --------------------------------------------------------------------------------
@dataclass
class StreamStep:
    """One training step of a stream.

    Attributes:
        loss: scalar to minimise (the quantizer's loss, plus the reconstruction loss where there is one).
        latents: ``[N, D]`` this step's latents, detached.
        indices: ``long [N]`` the codes they chose.
    """

    loss: Tensor
    latents: Tensor
    indices: Tensor


class LatentStream(ABC):
    """A source of latents that moves with the training step.

    Attributes:
        learning_rate: the stream's Adam learning rate (for the quantizer and the stream's own modules),
            unless the benchmark sets one for all streams.

    Args:
        dim: D, channels of the latents.
        steps: length of the run; the drift is spread over it.
        batch_size: latents per step.
        seed: seeds the data (identical for every quantizer trained on the stream).
    """

    learning_rate: float

    def __init__(self, dim: int, steps: int, batch_size: int, seed: int):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dim = dim
        self.steps = steps
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.final_generator = torch.Generator().manual_seed(seed + 1)

    def progress(self, step: int) -> float:
        """Fraction of the drift done at ``step``: 0 at the first step, 1 at the last."""
        return step / max(1, self.steps - 1)

    def trainable_modules(self) -> list[nn.Module]:
        """Modules of the stream itself that train with the quantizer (an encoder); none for synthetic streams.

        A stream without any has a final distribution that does not depend on the quantizer.
        """
        return []

    @abstractmethod
    def step(self, quantizer: Quantizer, step: int) -> StreamStep:
        """Draw this step's latents, quantize them, return the loss."""

    @abstractmethod
    def final_latents(self, num: int) -> Tensor:
        """``[num, D]`` latents from the distribution at the end of training (a fixed, separate sample)."""


def quantize_rows(quantizer: Quantizer, rows: Tensor):
    """Run a quantizer on ``[N, D]`` rows, presented as an ``[N, D, 1, 1]`` latent map."""
    return quantizer(rows.view(rows.shape[0], rows.shape[1], 1, 1))


class GaussianStream(LatentStream):
    """Latents ``~ N(mean(step), scale(step)^2 I)``; subclasses say how mean and scale move.

    Args:
        latent_scale: multiplies every latent (mean and spread): the same drift at another scale.
    """

    # A vq code that wins moves at most ~lr per step under Adam. 1e-2 lets winning codes keep up with the
    # drift (translation: 5 spreads over the run, under 1e-2 per step for runs of 500+ steps), so codes
    # that are lost are lost to the drift, not to a slow optimizer.
    learning_rate = 1e-2

    def __init__(self, dim: int, steps: int, batch_size: int, seed: int, latent_scale: float = 1.0):
        super().__init__(dim, steps, batch_size, seed)
        if not (latent_scale > 0 and math.isfinite(latent_scale)):
            raise ValueError(f"latent_scale must be a finite number > 0, got {latent_scale!r}")
        self.latent_scale = float(latent_scale)

    @abstractmethod
    def mean(self, step: int) -> Tensor:
        """``[D]`` mean of the cloud at ``step``."""

    @abstractmethod
    def scale(self, step: int) -> float:
        """Standard deviation (per dimension) of the cloud at ``step``."""

    def sample(self, step: int, num: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(num, self.dim, generator=generator)
        return self.mean(step) + self.scale(step) * noise

    def step(self, quantizer: Quantizer, step: int) -> StreamStep:
        latents = self.sample(step, self.batch_size, self.generator)
        out = quantize_rows(quantizer, latents)
        return StreamStep(loss=out.loss, latents=latents, indices=out.indices.reshape(-1))

    def final_latents(self, num: int) -> Tensor:
        return self.sample(self.steps - 1, num, self.final_generator)


class TranslationStream(GaussianStream):
    """A cloud of fixed spread whose mean moves from the origin ``travel`` spreads along a fixed direction.

    Args:
        travel: distance the mean moves over the run, in units of the cloud's standard deviation.
    """

    def __init__(
        self, dim: int, steps: int, batch_size: int, seed: int, latent_scale: float = 1.0, travel: float = 5.0
    ):
        super().__init__(dim, steps, batch_size, seed, latent_scale)
        if not (travel >= 0 and math.isfinite(travel)):
            raise ValueError(f"travel must be a finite number >= 0, got {travel!r}")
        self.travel = float(travel)
        direction = torch.randn(dim, generator=self.generator)
        self.direction = direction / direction.norm()

    def mean(self, step: int) -> Tensor:
        return self.latent_scale * self.travel * self.progress(step) * self.direction

    def scale(self, step: int) -> float:
        return self.latent_scale


class ShrinkingStream(GaussianStream):
    """A cloud at the origin whose spread decays exponentially to ``final_ratio`` of its start.

    Args:
        final_ratio: spread at the last step over spread at the first, in (0, 1].
    """

    def __init__(
        self, dim: int, steps: int, batch_size: int, seed: int, latent_scale: float = 1.0, final_ratio: float = 0.1
    ):
        super().__init__(dim, steps, batch_size, seed, latent_scale)
        if not 0.0 < final_ratio <= 1.0:
            raise ValueError(f"final_ratio must lie in (0, 1], got {final_ratio!r}")
        self.final_ratio = float(final_ratio)

    def mean(self, step: int) -> Tensor:
        return torch.zeros(self.dim)

    def scale(self, step: int) -> float:
        return self.latent_scale * self.final_ratio ** self.progress(step)


class AutoencoderStream(LatentStream):
    """Latents of an MLP encoder trained jointly with a decoder and the quantizer (a toy VQ-VAE).

    Data: ``x = tanh(s A) B`` with ``s ~ N(0, I_factors)`` and fixed random ``A``, ``B``: a curved
    low-dimensional manifold in ``data_dim`` dimensions. Loss: ``mse(decoder(quantized), x) + quantizer
    loss``. Nothing about the drift is prescribed: the latents move because the encoder learns.

    Args:
        data_dim: dimensions of the data.
        factors: intrinsic dimension of the data.
        hidden: width of the encoder and decoder MLPs.
    """

    def __init__(
        self, dim: int, steps: int, batch_size: int, seed: int, data_dim: int = 32, factors: int = 4, hidden: int = 64
    ):
        super().__init__(dim, steps, batch_size, seed)
        self.mixing = torch.randn(factors, hidden, generator=self.generator) / math.sqrt(factors)
        self.readout = torch.randn(hidden, data_dim, generator=self.generator) / math.sqrt(hidden)
        self.encoder = nn.Sequential(
            nn.Linear(data_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, data_dim)
        )

    # 1e-2 is too much for the encoder: plain vq's loss jumps five-fold within the first 50 steps.
    learning_rate = 3e-3

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    def data(self, num: int, generator: torch.Generator) -> Tensor:
        """``[num, data_dim]`` samples of the toy data."""
        factors = torch.randn(num, self.mixing.shape[0], generator=generator)
        return torch.tanh(factors @ self.mixing) @ self.readout

    def step(self, quantizer: Quantizer, step: int) -> StreamStep:
        x = self.data(self.batch_size, self.generator)
        latents = self.encoder(x)
        out = quantize_rows(quantizer, latents)
        reconstruction = self.decoder(out.quantized.reshape(latents.shape))
        loss = F.mse_loss(reconstruction, x) + out.loss
        return StreamStep(loss=loss, latents=latents.detach(), indices=out.indices.reshape(-1))

    def final_latents(self, num: int) -> Tensor:
        with torch.no_grad():
            return self.encoder(self.data(num, self.final_generator))


STREAMS = {
    "translation": TranslationStream,
    "translation_x4": partial(TranslationStream, latent_scale=4.0),
    "shrinking": ShrinkingStream,
    "autoencoder": AutoencoderStream,
}


def build_stream(name: str, dim: int, steps: int, batch_size: int, seed: int) -> LatentStream:
    """Build a latent stream by name (one of ``STREAMS``)."""
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose from {sorted(STREAMS)}")
    return STREAMS[name](dim, steps, batch_size, seed)


# -- the k-means reference -------------------------------------------------------------------------
def kmeans(
    points: Tensor, num_clusters: int, iterations: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """k-means++ seeding followed by Lloyd iterations.

    Args:
        points: ``[M, D]``, M >= num_clusters.
        num_clusters: K.
        iterations: Lloyd iterations after the seeding.
        generator: for the seeding's random draws.

    Returns:
        ``[K, D]`` centres. A centre that loses all its points keeps its position.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [M, D], got shape {tuple(points.shape)}")
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"need 1 <= num_clusters <= number of points ({points.shape[0]}), got {num_clusters}")
    points = points.float()
    # Seeding (Arthur & Vassilvitskii 2007): each new centre is a point drawn with probability
    # proportional to its squared distance to the nearest centre so far.
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centres = [points[first[0]]]
    nearest = (points - centres[0]).pow(2).sum(1)
    for _ in range(1, num_clusters):
        total = nearest.sum()
        weights = nearest / total if total > 0 else torch.ones_like(nearest)
        chosen = points[torch.multinomial(weights, 1, generator=generator)[0]]
        centres.append(chosen)
        nearest = torch.minimum(nearest, (points - chosen).pow(2).sum(1))
    centres = torch.stack(centres)
    for _ in range(iterations):
        assignment = nearest_codes(points, centres)
        counts = torch.bincount(assignment, minlength=num_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        occupied = counts > 0
        centres[occupied] = sums[occupied] / counts[occupied].unsqueeze(1)
    return centres


def codebook_mse(points: Tensor, codebook: Tensor) -> float:
    """Mean over points and dimensions of the squared error to the nearest code (``[M, D]``, ``[K, D]``)."""
    nearest = codebook[nearest_codes(points, codebook)]
    return F.mse_loss(nearest.float(), points.float()).item()


def kmeans_mse(points: Tensor, num_clusters: int, iterations: int, seed: int) -> float:
    """Quantisation error of k-means fitted on ``points`` (the reference every quantizer is compared to)."""
    generator = torch.Generator().manual_seed(seed)
    return codebook_mse(points, kmeans(points, num_clusters, iterations, generator))


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizerVariant:
    """A quantizer with a fixed set of options, as one row of the benchmark.

    Attributes:
        label: the row's name in the table and the plots.
        name: key in ``QUANTIZERS``.
        options: keyword options for ``build_quantizer``.
    """

    label: str
    name: str
    options: dict = field(default_factory=dict)


def quantizer_variants(names: list[str], nsvq_taus: tuple[float, ...] = NSVQ_TAUS) -> list[QuantizerVariant]:
    """One variant per registered quantizer with its defaults; for nsvq, a sweep of constant kernel widths
    tau and the scale-free ``tau_mode="relative"`` beside it (tau = 1 x the running mean of the winners'
    squared distance).

    tau is held constant in the sweep: a decaying schedule turns nsvq into plain vq by the end of the run
    (METHOD.md, NS-VQ), which would hide what a given width does to a drifting distribution.
    """
    variants = []
    for name in names:
        if name not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {name!r}; registered: {sorted(QUANTIZERS)}")
        if name == "nsvq":
            variants += [
                QuantizerVariant(f"nsvq tau={tau:g}", "nsvq", {"tau": tau, "tau_schedule": "constant"})
                for tau in nsvq_taus
            ]
            variants.append(
                QuantizerVariant(
                    "nsvq relative tau=1", "nsvq", {"tau": 1.0, "tau_mode": "relative", "tau_schedule": "constant"}
                )
            )
        else:
            variants.append(QuantizerVariant(name, name))
    return variants


@dataclass
class DriftBenchmarkConfig:
    """Everything a benchmark run depends on. The defaults are the full benchmark.

    Attributes:
        streams: names in ``STREAMS``.
        sizes: codebook sizes K.
        quantizers: names in ``QUANTIZERS``; ``None`` means every registered one.
        steps: training steps per run.
        batch_size: latents per step.
        dim: D, channels of the latents.
        learning_rate: Adam, for the quantizer and (autoencoder stream) the encoder and decoder; ``None``
            means each stream's own ``learning_rate``.
        window: utilisation counts the codes chosen at least once in the last ``window`` steps; ``None``
            means a tenth of the run.
        kmeans_iterations: Lloyd iterations of the reference.
        eval_samples_per_code, min_eval_samples: the final distribution is sampled with
            ``max(min_eval_samples, eval_samples_per_code * K)`` latents.
        seed: seeds data, models and the k-means seeding.
    """

    streams: list[str] = field(default_factory=lambda: ["translation", "translation_x4", "shrinking", "autoencoder"])
    sizes: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    quantizers: list[str] | None = None
    steps: int = 600
    batch_size: int = 512
    dim: int = 8
    learning_rate: float | None = None
    window: int | None = None
    kmeans_iterations: int = 20
    eval_samples_per_code: int = 8
    min_eval_samples: int = 8192
    seed: int = 0

    @classmethod
    def quick(cls) -> "DriftBenchmarkConfig":
        """A small subset for ``make demo``: one codebook size, three streams, a short run."""
        return cls(streams=["translation", "shrinking", "autoencoder"], sizes=[256], steps=400)

    def resolved_window(self) -> int:
        return self.window if self.window is not None else max(1, self.steps // 10)

    def check(self) -> None:
        for name in self.streams:
            if name not in STREAMS:
                raise ValueError(f"unknown stream {name!r}; choose from {sorted(STREAMS)}")
        for size in self.sizes:
            if not isinstance(size, int) or size < 2:
                raise ValueError(f"codebook sizes must be integers >= 2, got {size!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 1 <= self.resolved_window() <= self.steps:
            raise ValueError(f"window must lie in [1, steps={self.steps}], got {self.window!r}")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")


@dataclass
class RunResult:
    """One (stream, K, quantizer variant) run.

    Attributes:
        utilisation_window: fraction of codes chosen at least once in the last ``window`` steps.
        utilisation_final: fraction of codes chosen by at least one latent of the final distribution.
        mse: quantisation error on the final distribution (mean over latents and dims, eval mode).
        kmeans_mse: the same error for k-means fitted on that distribution.
        curve_steps, curve_utilisation: utilisation over the trailing window, along the run.
    """

    stream: str
    codebook_size: int
    label: str
    quantizer: str
    options: dict
    learning_rate: float
    utilisation_window: float
    utilisation_final: float
    mse: float
    kmeans_mse: float
    seconds: float
    curve_steps: list[int]
    curve_utilisation: list[float]

    @property
    def mse_ratio(self) -> float:
        return self.mse / self.kmeans_mse if self.kmeans_mse > 0 else math.inf


def train_on_stream(
    stream: LatentStream, quantizer: Quantizer, config: DriftBenchmarkConfig, learning_rate: float, on_step=None
) -> tuple[list[int], list[float], float]:
    """Train ``quantizer`` (and the stream's own modules) for ``config.steps`` steps with Adam.

    Args:
        learning_rate: Adam's, for every parameter.
        on_step: called after every step (a progress bar's update).

    Returns:
        ``(curve_steps, curve_utilisation, utilisation_window)``.
    """
    parameters = list(quantizer.parameters()) + [p for m in stream.trainable_modules() for p in m.parameters()]
    # The EMA quantizer learns without gradients; on a synthetic stream it has nothing for Adam.
    optimizer = torch.optim.Adam(parameters, lr=learning_rate) if parameters else None
    window = config.resolved_window()
    log_every = max(1, config.steps // 200)
    last_chosen = torch.full((quantizer.codebook_size,), -1, dtype=torch.long)
    curve_steps, curve_utilisation = [], []
    quantizer.train()
    for step in range(config.steps):
        quantizer.set_step(step)
        result = stream.step(quantizer, step)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
        last_chosen[result.indices] = step
        if step % log_every == 0 or step == config.steps - 1:
            curve_steps.append(step)
            chosen_recently = (last_chosen >= 0) & (last_chosen > step - window)
            curve_utilisation.append(chosen_recently.float().mean().item())
        if on_step is not None:
            on_step()
    return curve_steps, curve_utilisation, curve_utilisation[-1]


def evaluate_final(quantizer: Quantizer, latents: Tensor) -> tuple[float, float]:
    """Eval-mode utilisation and quantisation error of ``quantizer`` on ``[M, D]`` final latents.

    Uses the quantizer's own forward (not a Euclidean lookup in ``.codebook``), so a cosine-lookup
    quantizer such as fc is measured by what it actually outputs.
    """
    quantizer.eval()
    with torch.no_grad():
        out = quantize_rows(quantizer, latents)
    used = out.indices.unique().numel() / quantizer.codebook_size
    mse = F.mse_loss(out.quantized.reshape(latents.shape).float(), latents.float()).item()
    return used, mse


def run_drift_benchmark(config: DriftBenchmarkConfig, progress: bool = True) -> list[RunResult]:
    """Train every (stream, K, quantizer variant) combination of ``config`` and measure it.

    Every run of a stream sees the same data, and starts from the same seed.

    Returns:
        One :class:`RunResult` per combination, in stream, K, variant order.
    """
    config.check()
    variants = quantizer_variants(config.quantizers if config.quantizers is not None else list(QUANTIZERS))
    total = len(config.streams) * len(config.sizes) * len(variants) * config.steps
    results = []
    with tqdm(total=total, disable=not progress, unit="step", smoothing=0.05) as bar:
        for stream_name in config.streams:
            for size in config.sizes:
                reference_mse = None
                eval_samples = max(config.min_eval_samples, config.eval_samples_per_code * size)
                for variant in variants:
                    bar.set_description(f"{stream_name} K={size} {variant.label}")
                    torch.manual_seed(config.seed)
                    stream = build_stream(stream_name, config.dim, config.steps, config.batch_size, config.seed)
                    quantizer = build_quantizer(variant.name, size, config.dim, **variant.options)
                    learning_rate = stream.learning_rate if config.learning_rate is None else config.learning_rate
                    start = time.perf_counter()
                    curve_steps, curve_utilisation, utilisation_window = train_on_stream(
                        stream, quantizer, config, learning_rate, on_step=lambda: bar.update(1)
                    )
                    seconds = time.perf_counter() - start
                    latents = stream.final_latents(eval_samples)
                    utilisation_final, mse = evaluate_final(quantizer, latents)
                    # A synthetic stream's final distribution is the same for every variant; an encoder's is not.
                    if reference_mse is None or stream.trainable_modules():
                        reference_mse = kmeans_mse(latents, size, config.kmeans_iterations, config.seed)
                    results.append(
                        RunResult(
                            stream=stream_name,
                            codebook_size=size,
                            label=variant.label,
                            quantizer=variant.name,
                            options=dict(variant.options),
                            learning_rate=learning_rate,
                            utilisation_window=utilisation_window,
                            utilisation_final=utilisation_final,
                            mse=mse,
                            kmeans_mse=reference_mse,
                            seconds=seconds,
                            curve_steps=curve_steps,
                            curve_utilisation=curve_utilisation,
                        )
                    )
    return results


# -- reports ---------------------------------------------------------------------------------------
def results_table(results: list[RunResult], window: int) -> str:
    """Markdown table, one row per run."""
    lines = [
        f"| stream | K | quantizer | utilisation (last {window} steps) | utilisation (final dist.) "
        "| MSE | k-means MSE | MSE / k-means | Adam lr | train s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.stream} | {r.codebook_size} | {r.label} | {100 * r.utilisation_window:.1f}% "
            f"| {100 * r.utilisation_final:.1f}% | {r.mse:.4g} | {r.kmeans_mse:.4g} | {r.mse_ratio:.2f} "
            f"| {r.learning_rate:g} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_utilisation(results: list[RunResult], path: Path, window: int) -> None:
    """Utilisation-vs-step curves: a grid of streams (rows) by codebook sizes (columns), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(r.stream for r in results))
    sizes = list(dict.fromkeys(r.codebook_size for r in results))
    labels = list(dict.fromkeys(r.label for r in results))
    colours = {label: plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")(i) for i, label in enumerate(labels)}
    figure, axes = plt.subplots(
        len(streams), len(sizes), figsize=(4.2 * len(sizes), 3.0 * len(streams)), squeeze=False, sharey=True
    )
    for r in results:
        ax = axes[streams.index(r.stream)][sizes.index(r.codebook_size)]
        ax.plot(r.curve_steps, [100 * u for u in r.curve_utilisation], label=r.label, color=colours[r.label], lw=1.4)
    for row, stream in enumerate(streams):
        for col, size in enumerate(sizes):
            ax = axes[row][col]
            ax.set_title(f"{stream}, K={size}", fontsize=10)
            ax.set_ylim(0, 102)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"% codes used (last {window} steps)")
            if row == len(streams) - 1:
                ax.set_xlabel("step")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.tight_layout()
    figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_report(
    results: list[RunResult], config: DriftBenchmarkConfig, out_dir: str | Path, command: str = ""
) -> dict[str, Path]:
    """Write ``drift_table.md``, ``drift_results.json`` and ``drift_utilisation.png`` under ``out_dir``.

    Args:
        command: the command line that produced the results, recorded in the table and the JSON.

    Returns:
        ``{"table": path, "json": path, "plot": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    window = config.resolved_window()
    paths = {
        "table": out_dir / "drift_table.md",
        "json": out_dir / "drift_results.json",
        "plot": out_dir / "drift_utilisation.png",
    }
    header = "# Drift benchmark\n\n"
    if command:
        header += f"Command: `{command}`\n\n"
    header += (
        f"{config.steps} steps of Adam, {config.batch_size} latents per step, "
        f"D = {config.dim}. Utilisation: codes chosen at least once in the last {window} steps, and by the "
        "final distribution's sample. MSE: eval-mode quantisation error on that sample; k-means: "
        f"k-means++ and {config.kmeans_iterations} Lloyd iterations on the same sample.\n\n"
    )
    paths["table"].write_text(header + results_table(results, window))
    payload = {
        "command": command,
        "config": asdict(config) | {"window": window},
        "runs": [asdict(r) | {"mse_ratio": r.mse_ratio if math.isfinite(r.mse_ratio) else None} for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    plot_utilisation(results, paths["plot"], window)
    return paths
