"""The whole job in one call: tokenizer -> token grids -> prior -> pipeline -> rFID / gFID -> report.

Every stage writes into one output folder and is skipped when its finished output is already there, so a
killed run picks up where it stopped (a stage interrupted mid-training resumes from its last checkpoint):

    <output_dir>/
        configs/            the exact config of every stage (YAML), as run
        tokenizer/          stage one (train_tokenizer's folder: checkpoints, logs, tokenizer/)
        tokens/             token grids of the training and validation splits
        prior/              stage two (train_prior's folder: checkpoints, logs, prior/)
        pipeline/           VQARPipeline.save_pretrained
        metrics.json        rFID, gFID, reconstruction metrics, codebook usage, wall time per stage, recipe
        samples.png, reconstructions.png, code_usage.png, report.md

Under ``accelerate launch --num_processes N`` the two training stages run data-parallel; tokenisation and
evaluation run on the main process while the others wait.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.config import TokenizerTrainingConfig, load_config
from stage1_tokenizer.data import load_image_dataset, save_image_grid
from stage1_tokenizer.evaluation import evaluate_tokenizer, plot_code_usage
from stage1_tokenizer.metrics import ReconstructionMetrics
from stage1_tokenizer.training import train_tokenizer
from stage2_prior.token_dataset import tokenize_dataset
from stage2_prior.training import PriorTrainingConfig, train_prior

from .pipeline_vqar import VQARPipeline

logger = logging.getLogger(__name__)

SECTIONS = ("tokenizer", "tokenize", "prior", "evaluation")


@dataclass
class TokenizeConfig:
    """How the training images become token grids (``stage2_prior.tokenize_dataset``)."""

    batch_size: int = 64
    flip_augment: bool = True


@dataclass
class EvaluationConfig:
    """rFID / gFID against one reference split; both FIDs share the reference's Inception statistics."""

    reference_split: str = "test"
    num_reference_images: int = 500
    num_generated_images: int = 500
    batch_size: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    lpips_net: str = "alex"

    def __post_init__(self):
        for name in ("num_reference_images", "num_generated_images"):
            if getattr(self, name) < 2:
                raise ValueError(f"evaluation.{name} must be >= 2 (FID needs two images per side)")


@dataclass
class EndToEndConfig:
    """One run of the whole job. Each section is the config of its stage; the stage output folders are
    derived from ``output_dir`` and the data settings from the tokenizer section."""

    output_dir: str = "outputs/demo"
    tokenizer: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    prior: PriorTrainingConfig = field(default_factory=PriorTrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def _section(cls: type, values: dict, path: Path, forced: dict) -> Any:
    """Build one section's dataclass through ``load_config`` (same key checks and typing as the stage
    scripts), after writing it to ``path`` so the run keeps the exact config it used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**values, **forced}, sort_keys=False))
    return load_config(cls, ["--config", str(path)])


def parse_overrides(overrides: list[str]) -> dict[str, dict]:
    """``["tokenizer.max_steps=50", "output_dir=x"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. tokenizer.max_steps=50)")
        section, dot, name = key.partition(".")
        parsed = yaml.safe_load(value)
        if dot:
            if section not in SECTIONS:
                raise ValueError(f"override {item!r}: unknown section {section!r}; choose one of {SECTIONS}")
            nested.setdefault(section, {})[name] = parsed
        else:
            nested[section] = parsed
    return nested


def build_config(config_path: str | None = None, overrides: list[str] | None = None) -> EndToEndConfig:
    """Read a preset (YAML with ``output_dir`` and the four sections) and apply ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"config file {config_path!r} does not exist; presets live in configs/")
        values = yaml.safe_load(path.read_text()) or {}
    for key, value in parse_overrides(overrides or []).items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    unknown = set(values) - {"output_dir", *SECTIONS}
    if unknown:
        raise ValueError(f"unknown top-level key(s) {sorted(unknown)}; expected output_dir and {SECTIONS}")
    out = Path(values.get("output_dir", EndToEndConfig.output_dir))
    configs = out / "configs"
    tok = _section(TokenizerTrainingConfig, values.get("tokenizer", {}), configs / "tokenizer.yaml",
                   {"output_dir": str(out / "tokenizer")})
    prior = _section(PriorTrainingConfig, values.get("prior", {}), configs / "prior.yaml",
                     {"output_dir": str(out / "prior"), "token_dataset": str(out / "tokens"),
                      "expected_tokenizer": str(out / "tokenizer" / "tokenizer")})
    tokenize = _section(TokenizeConfig, values.get("tokenize", {}), configs / "tokenize.yaml", {})
    evaluation = _section(EvaluationConfig, values.get("evaluation", {}), configs / "evaluation.yaml", {})
    return EndToEndConfig(output_dir=str(out), tokenizer=tok, tokenize=tokenize, prior=prior, evaluation=evaluation)


def _finished(folder: Path) -> bool:
    """A model folder is finished when save_pretrained wrote both its config and its weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _resume_spec(run_dir: Path) -> str | None:
    return "latest" if any((run_dir / "checkpoints").glob("checkpoint-*")) else None


def run_end_to_end(cfg: EndToEndConfig) -> dict[str, Any]:
    """Run (or finish) every stage of ``cfg``; returns the metrics dict that ``metrics.json`` holds."""
    state = PartialState()
    out = Path(cfg.output_dir)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if state.is_main_process:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
            timings_path.write_text(json.dumps(timings, indent=2))
        return result

    def train_stage(stage: str, train, stage_cfg, run_dir: Path) -> Path:
        """Train a stage unless its final model folder exists; an interrupted one resumes from its last
        checkpoint. Returns the model folder (``<run_dir>/<run_dir.name>``, as both trainers write it)."""
        model_dir = run_dir / run_dir.name
        if _finished(model_dir):
            logger.info("%s already finished: %s", stage, model_dir)
        else:
            timed(stage, train, dataclasses.replace(stage_cfg, resume_from_checkpoint=_resume_spec(run_dir)))
        state.wait_for_everyone()
        return model_dir

    tok_dir = train_stage("tokenizer_training", train_tokenizer, cfg.tokenizer, out / "tokenizer")

    if state.is_main_process:
        timed("tokenization", tokenize_dataset, str(tok_dir), cfg.tokenizer.dataset, out / "tokens",
              image_size=cfg.tokenizer.image_size, batch_size=cfg.tokenize.batch_size,
              flip_augment=cfg.tokenize.flip_augment, num_images=cfg.tokenizer.num_images,
              seed=cfg.tokenizer.data_seed, cache_dir=cfg.tokenizer.cache_dir)
    state.wait_for_everyone()

    prior_dir = train_stage("prior_training", train_prior, cfg.prior, out / "prior")

    metrics: dict[str, Any] = {}
    if state.is_main_process:
        # SimVQ / TransVQ tokenizers also have a plain-table export (same codes, no codebook network).
        inference_dir = out / "tokenizer" / "tokenizer-inference"
        published = inference_dir if _finished(inference_dir) else tok_dir
        pipe = VQARPipeline(tokenizer=VQTokenizer.from_pretrained(published), prior=_load_prior(prior_dir))
        pipe.save_pretrained(out / "pipeline")
        metrics = timed("evaluation", evaluate_pipeline, pipe, cfg.evaluation, ReferenceData.of(cfg.tokenizer), out)
        metrics["wall_time_seconds"] = dict(timings)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (out / "report.md").write_text(render_report(cfg, metrics))
    state.wait_for_everyone()
    return metrics


def _load_prior(folder: Path):
    from stage2_prior import ImageTokenPrior

    return ImageTokenPrior.from_pretrained(folder)


@dataclass
class ReferenceData:
    """The image source and split that both FIDs compare against (the tokenizer's data settings)."""

    dataset: str = "synthetic-faces"
    image_size: int = 64
    num_images: int | None = None  # size of the whole source (load_image_dataset's num_images)
    seed: int = 0
    cache_dir: str | None = None

    @classmethod
    def of(cls, tok: TokenizerTrainingConfig) -> "ReferenceData":
        return cls(tok.dataset, tok.image_size, tok.num_images, tok.data_seed, tok.cache_dir)


@torch.no_grad()
def evaluate_pipeline(pipe: VQARPipeline, ev: EvaluationConfig, data: ReferenceData, out: Path) -> dict[str, Any]:
    """rFID + reconstruction metrics of the tokenizer and gFID of the pipeline, on one reference split.

    The reference images pass through Inception once: their statistics serve both FIDs, so the gap
    between rFID and gFID is what the prior adds on top of the tokenizer.
    """
    out.mkdir(parents=True, exist_ok=True)
    reference = load_image_dataset(data.dataset, split=ev.reference_split, image_size=data.image_size,
                                   num_images=data.num_images, seed=data.seed, cache_dir=data.cache_dir)
    num_reference = min(ev.num_reference_images, len(reference))
    metrics = ReconstructionMetrics("cpu", lpips_net=ev.lpips_net, keep_real_fid=True)
    recon, counts, grid = evaluate_tokenizer(pipe.tokenizer, reference, batch_size=ev.batch_size,
                                             num_images=num_reference, metrics=metrics)
    save_image_grid(grid, out / "reconstructions.png", nrow=grid.shape[0] // 2)
    plot_code_usage(counts, out / "code_usage.png", title=str(pipe.tokenizer.config.quantizer))

    fid = metrics.fid
    fid.reset()  # forgets the reconstructions, keeps the reference statistics
    generator = torch.Generator().manual_seed(ev.seed)
    shown = []
    for start in range(0, ev.num_generated_images, ev.batch_size):
        size = min(ev.batch_size, ev.num_generated_images - start)
        images = pipe(batch_size=size, generator=generator, temperature=ev.temperature, top_k=ev.top_k,
                      top_p=ev.top_p, output_type="pt").images
        fid.update_fake(images * 2 - 1)
        if sum(len(x) for x in shown) < 64:
            shown.append(images)
    samples = torch.cat(shown)[:64]
    save_image_grid(samples * 2 - 1, out / "samples.png", nrow=int(math.ceil(math.sqrt(len(samples)))))
    return {
        "quantizer": pipe.tokenizer.config.quantizer,
        "codebook_size": pipe.tokenizer.config.codebook_size,
        "tokenizer": recon,
        "gfid": fid.compute(),
        "recipe": {
            "reference": {"dataset": data.dataset, "split": ev.reference_split, "num_images": num_reference,
                          "image_size": data.image_size, "source_size": data.num_images, "seed": data.seed},
            "num_generated_images": ev.num_generated_images,
            "sampling": {"temperature": ev.temperature, "top_k": ev.top_k, "top_p": ev.top_p, "seed": ev.seed},
            **metrics.recipe(),
        },
    }


def render_report(cfg: EndToEndConfig, metrics: dict[str, Any]) -> str:
    """A short markdown report of the run: the numbers, the pictures, the time per stage."""
    tok = metrics["tokenizer"]
    rows = [
        ("quantizer", f"{metrics['quantizer']} (K = {metrics['codebook_size']})"),
        ("codebook utilisation (reference split)", f"{tok['utilisation']:.1%} ({tok['dead_codes']} dead codes)"),
        ("rFID (tokenizer)", f"{tok['rfid']:.2f}"),
        ("gFID (pipeline)", f"{metrics['gfid']:.2f}"),
        ("LPIPS / SSIM / PSNR", f"{tok['lpips']:.4f} / {tok['ssim']:.4f} / {tok['psnr']:.2f} dB"),
    ]
    ref = metrics["recipe"]["reference"]
    lines = [
        f"# driftvq run: {cfg.output_dir}",
        "",
        f"Data: {ref['dataset']} at {ref['image_size']} px. FIDs: {ref['num_images']} reference images "
        f"({ref['split']} split) against as many reconstructions (rFID) and "
        f"{metrics['recipe']['num_generated_images']} samples (gFID); 2048-d Inception features. FIDs from a "
        "few hundred images are biased upwards: compare them only with runs of the same size.",
        "",
        "| measure | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "| stage | wall time |",
        "| --- | --- |",
        *[f"| {stage} | {seconds / 60:.1f} min |" for stage, seconds in metrics["wall_time_seconds"].items()],
        "",
        "Samples: ![samples](samples.png)",
        "",
        "Reconstructions (inputs above, reconstructions below): ![reconstructions](reconstructions.png)",
        "",
        "Codebook usage: ![code usage](code_usage.png)",
        "",
        "Load the pipeline: `VQARPipeline.from_pretrained(\"" + str(Path(cfg.output_dir) / "pipeline") + "\")`",
        "",
    ]
    return "\n".join(lines)
