"""Publishing a prior or a whole pipeline (and, through stage one's ``model_card``, a tokenizer) to the Hub.

Each ``save_*_folder`` writes, with no network, exactly what is uploaded: the weights and configs
(``save_pretrained``), a ``README.md`` model card (YAML metadata, what the model is, the measured numbers,
how to load it) and, for a pipeline, the code files of diffusers' remote-code layout (below).
:func:`push_folder` uploads such a folder with ``huggingface_hub`` (stage one's ``push_to_hub``). The token
comes from the standard login (``hf auth login``) or ``HF_TOKEN`` and is never printed or logged.

A published pipeline uses diffusers' remote-code layout, because diffusers 0.42.1 (checked) downloads a
pipeline from the Hub only when every component comes from diffusers, transformers, or a code file in the
repository (``DiffusionPipeline.download`` raises "prior/stage2_prior.prior.py ... does not exist"
otherwise). So the folder holds, beside ``save_pretrained``'s output, one small file per component
(``tokenizer/stage1_tokenizer.model.py``, ``prior/stage2_prior.prior.py``) and ``pipeline.py`` at the
root, each of which only imports the class from the installed driftvq package, and ``model_index.json``
names the pipeline ``["pipeline", "VQARPipeline"]``. Any load of the folder then runs those files, which
diffusers allows only with ``trust_remote_code=True``:

    DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)      # diffusers only (driftvq installed)
    VQARPipeline.from_pretrained(repo, trust_remote_code=True)           # from pipelines import VQARPipeline

A folder written by plain ``save_pretrained`` has none of these files and loads locally with
``VQARPipeline.from_pretrained(folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer import model_card as tokenizer_card
from stage2_prior import ImageTokenPrior

from .pipeline_vqar import VQARPipeline

KINDS = ("tokenizer", "prior", "pipeline")

# Every measured number a card can show, in display order. Stage one's card shows the reconstruction
# metrics under its own labels and codebook usage in a table of its own.
TOKENIZER_USAGE_KEYS = ("utilisation", "perplexity", "dead_codes")
METRIC_LABELS = {
    "gfid": "gFID (generated samples)",
    **{name: f"{label} (tokenizer reconstructions)" for name, label in tokenizer_card.METRIC_LABELS.items()},
    "utilisation": "codebook utilisation",
    "dead_codes": "dead codes",
    "perplexity": "code perplexity",
    "loss": "validation loss (nats / token)",
    "bits_per_token": "validation bits / token",
}
# Sub-dicts of this project's result files that hold settings, not measurements.
NOT_MEASUREMENTS = ("recipe", "wall_time_seconds", "sampling")

# The code files of diffusers' remote-code layout: the pipeline's at the root (named by ``_class_name``),
# a component's in its folder, named after the library recorded for it in model_index.json.
PIPELINE_CODE_FILE = "pipeline.py"
CODE_FILE_TEMPLATE = '''"""diffusers remote-code entry of a driftvq {what}: it imports the installed package."""

try:
    from {module} import {name}
except ImportError as error:
    raise ImportError(
        "this repository holds a driftvq {what}; install the driftvq package (pip install driftvq) to load it"
    ) from error

__all__ = ["{name}"]
'''


def _measured_table(metrics: dict[str, float]) -> list[str]:
    rows = [f"| {METRIC_LABELS[k]} | {_format_number(metrics[k])} |" for k in METRIC_LABELS if k in metrics]
    return ["| metric | value |", "| --- | --- |", *rows]


def _format_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return f"{value:.1f}"
    return f"{value:.4g}"


def _check_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    metrics = dict(metrics or {})
    unknown = sorted(set(metrics) - set(METRIC_LABELS))
    if unknown:
        raise ValueError(f"unknown metric names {unknown}; a card shows {list(METRIC_LABELS)}")
    return metrics


def _card(card_data: ModelCardData, body: list[str]) -> str:
    return "\n".join(["---", card_data.to_yaml(), "---", "", *body, ""])


def _prior_rows(prior: ImageTokenPrior) -> list[str]:
    config = prior.config
    height, width = prior.grid_size
    num_params = sum(p.numel() for p in prior.parameters())
    classes = (
        f"{prior.num_classes} ({', '.join(config.class_names)})" if getattr(config, "class_names", None)
        else str(prior.num_classes) if prior.num_classes else "0 (unconditional)"
    )
    return [
        f"| prior | Llama causal LM, {config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads |",
        f"| prior parameters | {num_params / 1e6:.2f} M |",
        f"| codebook size K | {prior.codebook_size} |",
        f"| token grid | {height} x {width} (raster order, {height * width + 1} positions with the class token) |",
        f"| classes | {classes} |",
    ]


def _sampling_call(prior: ImageTokenPrior) -> str:
    if prior.num_classes:
        return "batch_size=4, class_labels=[0] * 4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)"
    return "batch_size=4, generator=torch.Generator().manual_seed(0)"


def _data_and_measured(datasets: list[str] | None, metrics: dict[str, float] | None) -> list[str]:
    """The card lines every kind shares after its property table: the training data row, the measured numbers."""
    lines = [f"| training data | {', '.join(datasets)} |"] if datasets else []
    if metrics:
        lines += ["", "## Measured", "", *_measured_table(metrics)]
    return lines


def prior_card_text(
    prior: ImageTokenPrior,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """The README.md of a published prior: YAML metadata, what it models, its numbers, how to sample.

    Args:
        prior: the prior as published.
        metrics: measured numbers, names from :data:`METRIC_LABELS` (e.g. ``{"loss": .., "bits_per_token": ..}``).
        datasets: Hub ids (or names) of the images whose token grids it was trained on.
        repo_id: where it is published (for the usage snippet).

    Returns:
        The card text.
    """
    metrics = _check_metrics(metrics)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["driftvq", "image-token-prior", "autoregressive", "llama", "vector-quantization"],
        datasets=datasets or None,
        metrics=[name for name in METRIC_LABELS if name in metrics] or None,
    )
    height, width = prior.grid_size
    source = repo_id or "path/to/this/folder"
    body = [
        f"# driftvq image-token prior (K = {prior.codebook_size}, {height} x {width} grid)",
        "",
        "An autoregressive prior over the token grids of a driftvq VQ tokenizer: a Llama causal LM that reads a "
        "class (or null) token and then predicts the grid's codes in raster order. Its config records the grid, "
        "the codebook size and the fingerprint of the tokenizer whose tokens it models (`tokenizer_hash`: "
        f"{prior.config.tokenizer_hash or 'not recorded'}); decode its samples with that tokenizer.",
        "",
        "| property | value |",
        "| --- | --- |",
        *_prior_rows(prior),
    ]
    body += _data_and_measured(datasets, metrics)
    body += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from stage2_prior import ImageTokenPrior, sample_grids  # pip install driftvq",
        "",
        f'prior = ImageTokenPrior.from_pretrained("{source}").eval()',
        f"grids = sample_grids(prior, {_sampling_call(prior)})  # long [4, {height}, {width}]",
        "```",
        "",
        "The weights are an ordinary Llama checkpoint: `transformers.AutoModelForCausalLM` loads them too, "
        "without the token layout that `sample_grids` relies on.",
    ]
    return _card(card_data, body)


def save_prior_folder(
    prior: ImageTokenPrior,
    folder: str | Path,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a publishable prior folder: ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``README.md``.

    Args:
        prior: the trained prior.
        folder: where to write (created).
        metrics, datasets, repo_id: for :func:`prior_card_text`.

    Returns:
        The folder.
    """
    folder = Path(folder)
    card = prior_card_text(prior, metrics=metrics, datasets=datasets, repo_id=repo_id)
    prior.save_pretrained(folder)
    ModelCard(card).save(folder / "README.md")
    return folder


def pipeline_card_text(
    pipe: VQARPipeline,
    trained_quantizer: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """The README.md of a published pipeline: YAML metadata, both stages, the numbers, both ways to load it.

    Args:
        pipe: the pipeline as published.
        trained_quantizer: the quantizer the tokenizer was trained with (default: the tokenizer's own; an
            exported TransVQ tokenizer holds a plain "vq" table).
        metrics: measured numbers, names from :data:`METRIC_LABELS` (e.g. ``gfid``, ``rfid``, ``utilisation``).
        datasets: Hub ids (or names) of the training images.
        repo_id: where it is published (for the usage snippets).

    Returns:
        The card text.
    """
    metrics = _check_metrics(metrics)
    tokenizer, prior = pipe.tokenizer, pipe.prior
    trained = trained_quantizer or tokenizer.config.quantizer
    size = tokenizer.config.sample_size
    conditional = prior.num_classes > 0
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="unconditional-image-generation" if not conditional else None,
        tags=["driftvq", "autoregressive", "image-tokenizer", "vector-quantization", trained,
              "class-conditional" if conditional else "unconditional-image-generation"],
        datasets=datasets or None,
        metrics=[name for name in METRIC_LABELS if name in metrics] or None,
    )
    height, width = prior.grid_size
    source = repo_id or "path/to/this/folder"
    body = [
        f"# driftvq pipeline: {trained} tokenizer (K = {tokenizer.config.codebook_size}) + autoregressive prior",
        "",
        f"A two-stage image generator ({size} x {size} px). The prior, a Llama causal LM, samples {height} x {width} "
        "grids of codebook indices in raster order; the VQ tokenizer "
        f"({tokenizer_card.QUANTIZER_DESCRIPTIONS.get(trained, trained)}) decodes them to images.",
        "",
        "| property | value |",
        "| --- | --- |",
        f"| tokenizer quantizer (training) | {trained} |",
        f"| code dimension D | {tokenizer.config.latent_channels} |",
        f"| tokenizer parameters | {sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f} M |",
        f"| image size | {size} x {size} |",
        *_prior_rows(prior),
    ]
    body += _data_and_measured(datasets, metrics)
    body += [
        "",
        "## Usage",
        "",
        "The pipeline's code is the driftvq package; install it first (`pip install driftvq`). Then:",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{source}", trust_remote_code=True)',
        f"images = pipe({_sampling_call(prior)}).images  # 4 PIL images",
        "```",
        "",
        "`trust_remote_code=True` lets diffusers run the repository's `pipeline.py`, "
        "`tokenizer/stage1_tokenizer.model.py` and `prior/stage2_prior.prior.py`; each only imports its class "
        "from the installed driftvq package. The same works as "
        f'`from pipelines import VQARPipeline; VQARPipeline.from_pretrained("{source}", trust_remote_code=True)`.',
        "",
        'Other outputs: `output_type="np"` (float `[B, H, W, 3]` in [0, 1]), `"pt"` (`[B, 3, H, W]` in [0, 1]), '
        '`"tokens"` (the long `[B, h, w]` grids).',
    ]
    return _card(card_data, body)


def save_pipeline_folder(
    pipe: VQARPipeline,
    folder: str | Path,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
    export: bool = True,
) -> Path:
    """Write a publishable pipeline folder: ``save_pretrained``'s output (``model_index.json``, ``tokenizer/``,
    ``prior/``), the code files of diffusers' remote-code layout (see the module docstring) and ``README.md``.

    Args:
        pipe: the pipeline.
        folder: where to write (created).
        metrics, datasets, repo_id: for :func:`pipeline_card_text`.
        export: where the tokenizer's quantizer computes its codebook from trained parameters (SimVQ,
            TransVQ), publish ``export_for_inference()``'s plain table (same codes, same images), as stage
            one's ``save_tokenizer_folder`` does; the card names the quantizer it was trained with.

    Returns:
        The folder.
    """
    folder = Path(folder)
    trained = pipe.tokenizer.config.quantizer
    if export and hasattr(pipe.tokenizer.quantize, "export_codebook"):
        pipe = type(pipe)(tokenizer=pipe.tokenizer.export_for_inference(), prior=pipe.prior)
    card = pipeline_card_text(pipe, trained_quantizer=trained, metrics=metrics, datasets=datasets, repo_id=repo_id)
    pipe.save_pretrained(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for component in ("tokenizer", "prior"):
        library, class_name = index[component]
        (folder / component / f"{library}.py").write_text(
            CODE_FILE_TEMPLATE.format(what=component, module=library, name=class_name))
    pipeline_class = type(pipe)
    (folder / PIPELINE_CODE_FILE).write_text(
        CODE_FILE_TEMPLATE.format(what="pipeline", module=pipeline_class.__module__, name=pipeline_class.__name__))
    index["_class_name"] = [Path(PIPELINE_CODE_FILE).stem, pipeline_class.__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    ModelCard(card).save(folder / "README.md")
    return folder


def read_metrics(path: str | Path) -> dict[str, float]:
    """The measured numbers in a JSON file of this project, by the names of :data:`METRIC_LABELS`.

    Reads a flat ``{name: value}`` file as well as the nested ones the scripts write: ``evaluate_tokenizer``'s
    ``metrics.json`` (``{"metrics": {...}}``), ``train.py``'s ``metrics.json`` (``{"gfid": .., "tokenizer":
    {...}}``) and ``train_prior``'s ``result.json`` (``{"validation": {...}}``). Settings (``recipe``) and
    unknown names are skipped.

    Raises:
        ValueError: the file holds none of the known metrics, or one metric twice with different values.
    """
    found: dict[str, float] = {}

    def visit(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                if key not in NOT_MEASUREMENTS:
                    visit(value)
            elif key in METRIC_LABELS and isinstance(value, (int, float)) and not isinstance(value, bool):
                if key in found and found[key] != value:
                    raise ValueError(
                        f"{str(path)!r} gives {key} twice ({found[key]} and {value}); pass a file with one value"
                    )
                found[key] = value

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        visit(data)
    if not found:
        raise ValueError(f"{str(path)!r} holds none of the metrics {list(METRIC_LABELS)}")
    return found


def write_publish_folder(
    kind: str,
    source: str | Path,
    folder: str | Path,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Load a saved tokenizer, prior or pipeline and write its publishable folder (weights + card).

    Args:
        kind: one of :data:`KINDS`.
        source: what ``from_pretrained`` of that kind loads (a training run's ``tokenizer/``, ``prior/`` or
            ``pipeline/`` folder, or a Hub id).
        folder: where to write; must not exist or be empty.
        metrics: measured numbers (see :func:`read_metrics`); a tokenizer's card shows the reconstruction
            metrics and codebook usage among them.
        datasets, repo_id: for the card.

    Returns:
        The folder.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # Everything in the folder is uploaded: files left from another run would be published with this one.
    if Path(folder).exists() and any(Path(folder).iterdir()):
        raise ValueError(f"{str(folder)!r} is not empty; remove it or write to another folder")
    metrics = _check_metrics(metrics)
    if kind == "tokenizer":
        return tokenizer_card.save_tokenizer_folder(
            VQTokenizer.from_pretrained(source).eval(),
            folder,
            metrics={k: v for k, v in metrics.items() if k in tokenizer_card.METRIC_LABELS},
            usage={k: v for k, v in metrics.items() if k in TOKENIZER_USAGE_KEYS},
            datasets=datasets,
            repo_id=repo_id,
        )
    if kind == "prior":
        prior = ImageTokenPrior.from_pretrained(source).eval()
        return save_prior_folder(prior, folder, metrics=metrics, datasets=datasets, repo_id=repo_id)
    pipe = VQARPipeline.from_pretrained(source)
    return save_pipeline_folder(pipe, folder, metrics=metrics, datasets=datasets, repo_id=repo_id)


def folder_kind(folder: str | Path) -> str:
    """Which of :data:`KINDS` a publishable folder holds, from its files.

    Raises:
        ValueError: no model card, or neither a pipeline's ``model_index.json`` nor a model's ``config.json``.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ValueError(
            f"{str(folder)!r} has no README.md model card; write the folder with scripts/push_to_hub.py --dry_run "
            "(or pipelines.hub.write_publish_folder) first"
        )
    if (folder / "model_index.json").is_file():
        return "pipeline"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(folder)!r} holds neither model_index.json (a pipeline) nor config.json (a model)")
    # diffusers' ConfigMixin records the class (the tokenizer); transformers records the model type (the prior).
    return "tokenizer" if "_class_name" in json.loads(config_path.read_text()) else "prior"


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload a folder written by one of the ``save_*_folder`` functions to a Hub model repository.

    Args:
        folder: the folder (its files are uploaded as they are, README.md card included).
        repo_id: ``"user/name"``; created if missing.
        token: a Hub token; None uses the standard login or ``HF_TOKEN``. Never printed or logged.
        private: create the repository as private.

    Returns:
        The URL of the commit.
    """
    kind = folder_kind(folder)
    return tokenizer_card.push_to_hub(
        repo_id, folder, token=token, private=private, commit_message=f"Upload driftvq {kind}"
    )
