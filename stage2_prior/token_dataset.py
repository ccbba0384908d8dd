"""Token-grid datasets: an image dataset encoded once by a trained tokenizer, stored as a ``datasets`` Arrow dataset.

Layout of ``output_dir`` (``DatasetDict.save_to_disk`` plus one JSON file)::

    dataset_dict.json, train/, validation/     columns: tokens (h*w codes, raster order, int16 or int32),
                                               labels (the source's attribute vector), index (position of
                                               the image in its split), flipped (a mirrored copy?)
    token_dataset.json                         TokenDatasetInfo: which tokenizer made the tokens, grid size,
                                               source, attribute names; written last = "complete"

The tokens are only meaningful to the tokenizer that made them, so the info records its fingerprint
(:func:`tokenizer_fingerprint`: a hash of its config and of its weights); :func:`load_token_dataset` and the
prior's training refuse tokens of another tokenizer with a ValueError.

Resuming: encoding writes ``shards/<split>/shard-<i>`` folders of ``shard_size`` images, each one written
under a temporary name and renamed when complete. An interrupted run restarted with the same arguments
skips the finished shards; with other arguments it stops (``shards/job.json`` records them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.data import load_image_dataset

INFO_FILE = "token_dataset.json"
SHARDS_DIR = "shards"
JOB_FILE = "job.json"
FORMAT_VERSION = 1
# int16 holds codes up to 32767; larger codebooks (the 65,536-code ImageNet tokenizers) need int32.
INT16_MAX_CODES = 2**15


def tokenizer_fingerprint(tokenizer: VQTokenizer) -> str:
    """A 16-hex-digit hash of the tokenizer's config and weights: equal exactly when the tokens are compatible.

    The config part leaves out diffusers' private keys (``_name_or_path``, ``_diffusers_version``, ...), so a
    tokenizer and its ``save_pretrained`` / ``from_pretrained`` copy agree; the weights part hashes every
    tensor of the state dict (name, dtype, shape and bytes), so two trainings of one config do not.
    """
    digest = hashlib.sha256()
    config = {key: value for key, value in dict(tokenizer.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_tokenizer(tokenizer: VQTokenizer | str | Path) -> tuple[VQTokenizer, str | None]:
    """A tokenizer object (as given, or loaded from a local folder or Hub id) and the name to record for it."""
    if isinstance(tokenizer, VQTokenizer):
        name = tokenizer.config.get("_name_or_path")
        return tokenizer, (str(name) if name else None)
    if isinstance(tokenizer, (str, Path)):
        return VQTokenizer.from_pretrained(str(tokenizer)).eval(), str(tokenizer)
    raise ValueError(
        "tokenizer must be a VQTokenizer, a folder saved by save_pretrained or a Hub id, "
        f"got {type(tokenizer).__name__}"
    )


def check_same_tokenizer(found_hash: str | None, expected_hash: str, found_where: str) -> None:
    """Raise ValueError when tokens (or a prior) made with tokenizer ``found_hash`` meet another tokenizer."""
    if found_hash != expected_hash:
        raise ValueError(
            f"{found_where} was made with the tokenizer of fingerprint {found_hash!r}, but tokenizer {expected_hash!r} "
            "was expected; codes of one tokenizer mean nothing to another. Re-encode the images with this "
            "tokenizer (scripts/tokenize_dataset.py) or use the tokenizer that made them"
        )


@dataclass
class TokenDatasetInfo:
    """What ``token_dataset.json`` records about a token-grid dataset."""

    tokenizer: str | None  # the folder or Hub id it was loaded from, when known
    tokenizer_hash: str
    codebook_size: int
    grid_size: list[int]  # [h, w]
    image_size: int
    source: str
    flip_augment: bool
    attribute_names: list[str]
    num_classes_per_attribute: list[int]
    num_rows: dict[str, int]
    job: dict  # the arguments that produced it; a rerun with other arguments refuses to mix
    format_version: int = FORMAT_VERSION

    def save(self, folder: str | Path) -> None:
        (Path(folder) / INFO_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "TokenDatasetInfo":
        path = Path(folder) / INFO_FILE
        if not path.is_file():
            raise ValueError(
                f"{str(folder)!r} is not a complete token dataset (no {INFO_FILE}); create it with "
                "scripts/tokenize_dataset.py, or rerun that command to finish an interrupted one"
            )
        values = json.loads(path.read_text())
        if values.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format version {values.get('format_version')}, this code reads {FORMAT_VERSION}; "
                "re-create the token dataset"
            )
        return cls(**values)


@dataclass
class TokenGridDataset:
    """A loaded token-grid dataset: the Arrow splits and their :class:`TokenDatasetInfo`."""

    splits: datasets.DatasetDict
    info: TokenDatasetInfo

    def __getitem__(self, split: str) -> datasets.Dataset:
        if split not in self.splits:
            raise ValueError(f"the token dataset has no split {split!r}; it has {list(self.splits)}")
        return self.splits[split]


def load_token_dataset(
    path: str | Path,
    expected_tokenizer: VQTokenizer | str | Path | None = None,
    expected_tokenizer_hash: str | None = None,
) -> TokenGridDataset:
    """Open a token-grid dataset written by :func:`tokenize_dataset`.

    Args:
        path: its folder.
        expected_tokenizer: the tokenizer (object, folder or Hub id) the tokens must come from; None: no check.
        expected_tokenizer_hash: the same check against a :func:`tokenizer_fingerprint` value (e.g. the one a
            prior's config records).

    Raises:
        ValueError: an incomplete folder, or tokens from another tokenizer.
    """
    info = TokenDatasetInfo.load(path)
    if expected_tokenizer is not None:
        check_same_tokenizer(info.tokenizer_hash, tokenizer_fingerprint(resolve_tokenizer(expected_tokenizer)[0]),
                             f"the token dataset {str(path)!r}")
    if expected_tokenizer_hash is not None:
        check_same_tokenizer(info.tokenizer_hash, expected_tokenizer_hash, f"the token dataset {str(path)!r}")
    return TokenGridDataset(splits=datasets.load_from_disk(str(path)), info=info)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' own progress bars for the block (and restore them if they were on)."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def _features(num_codes: int, codebook_size: int, num_attributes: int) -> datasets.Features:
    code_type = "int16" if codebook_size <= INT16_MAX_CODES else "int32"
    return datasets.Features(
        {
            "tokens": datasets.List(datasets.Value(code_type), length=num_codes),
            "labels": datasets.List(datasets.Value("int64"), length=num_attributes if num_attributes else -1),
            "index": datasets.Value("int64"),
            "flipped": datasets.Value("bool"),
        }
    )


def _encode_shard(
    tokenizer: VQTokenizer,
    images: Subset,
    batch_size: int,
    flip_augment: bool,
    num_workers: int,
    progress: tqdm,
) -> dict[str, list]:
    """Encode one shard of images (and, with ``flip_augment``, their mirror images) into column lists."""
    rows: dict[str, list] = {"tokens": [], "labels": [], "index": [], "flipped": []}
    device = tokenizer.device
    positions = iter(images.indices)
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        pixels = batch["pixel_values"].to(device=device, dtype=tokenizer.dtype)
        labels = batch["labels"].tolist()
        indices = [next(positions) for _ in labels]
        variants = [(pixels, False), (pixels.flip(-1), True)] if flip_augment else [(pixels, False)]
        for variant, flipped in variants:
            codes: Tensor = tokenizer.encode(variant)
            rows["tokens"].extend(codes.reshape(codes.shape[0], -1).cpu().tolist())
            rows["labels"].extend(labels)
            rows["index"].extend(indices)
            rows["flipped"].extend([flipped] * len(labels))
        progress.update(len(labels))
    return rows


def tokenize_dataset(
    tokenizer: VQTokenizer | str | Path,
    source: str,
    output_dir: str | Path,
    image_size: int = 64,
    batch_size: int = 64,
    splits: Sequence[str] = ("train", "validation"),
    flip_augment: bool = False,
    num_images: int | None = None,
    seed: int = 0,
    shard_size: int = 4096,
    num_workers: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
) -> TokenGridDataset:
    """Encode every image of ``source`` with ``tokenizer`` and save the token grids (resumable).

    Args:
        tokenizer: a ``VQTokenizer`` (used on its current device), a folder saved by ``save_pretrained``, or
            a Hub id.
        source: an image source of :func:`stage1_tokenizer.data.load_image_dataset` ("synthetic-faces",
            "lfw-subset", an image folder, a Hub dataset id).
        output_dir: where the dataset goes (see the module docstring).
        image_size: image side the images are resized and cropped to before encoding.
        batch_size: images encoded at once.
        splits: which splits to encode.
        flip_augment: also store the tokens of every training image mirrored left-right (train split only:
            the validation loss must measure the real images). Doubles the training rows.
        num_images, seed, cache_dir: passed to ``load_image_dataset`` (size of the whole source, synthetic
            seed, cache folder).
        shard_size: images per shard, the unit of resumption.
        num_workers: DataLoader worker processes for image decoding.
        progress: show a tqdm bar.

    Returns:
        The saved dataset, opened (:class:`TokenGridDataset`).

    Raises:
        ValueError: bad arguments, or an ``output_dir`` that holds a dataset or shards made with other arguments.
    """
    for name, value in (("image_size", image_size), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    splits = list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be a non-empty list of distinct split names, got {splits!r}")
    tok, tokenizer_name = resolve_tokenizer(tokenizer)
    tok.eval()
    fingerprint = tokenizer_fingerprint(tok)
    grid = tok.grid_size(image_size)
    codebook_size = int(tok.config.codebook_size)
    job = {
        "tokenizer_hash": fingerprint, "source": source, "image_size": image_size, "splits": splits,
        "flip_augment": bool(flip_augment), "num_images": num_images, "seed": seed, "shard_size": shard_size,
        "format_version": FORMAT_VERSION,
    }
    output = Path(output_dir)
    if (output / INFO_FILE).is_file():
        existing = TokenDatasetInfo.load(output)
        if existing.job != job:
            raise ValueError(
                f"{str(output)!r} already holds a token dataset made with other arguments ({existing.job}); "
                "choose another output_dir or delete that one"
            )
        return load_token_dataset(output)

    shard_root = output / SHARDS_DIR
    shard_root.mkdir(parents=True, exist_ok=True)
    job_file = shard_root / JOB_FILE
    if job_file.is_file() and json.loads(job_file.read_text()) != job:
        raise ValueError(
            f"{str(shard_root)!r} holds shards of an interrupted run with other arguments "
            f"({json.loads(job_file.read_text())}); rerun with those, or delete the folder to start over"
        )
    job_file.write_text(json.dumps(job, indent=2))

    image_sets = {
        split: load_image_dataset(source, split, image_size, num_images=num_images, seed=seed, cache_dir=cache_dir)
        for split in splits
    }
    first = image_sets[splits[0]]
    attribute_names = list(first.attribute_names)
    num_classes_per_attribute = list(first.num_classes_per_attribute)
    features = _features(grid[0] * grid[1], codebook_size, len(attribute_names))

    def shard_path(split: str, number: int) -> Path:
        return shard_root / split / f"shard-{number:05d}"

    plan = [
        (split, number, range(start, min(start + shard_size, len(images))))
        for split, images in image_sets.items()
        for number, start in enumerate(range(0, len(images), shard_size))
    ]
    done = sum(len(positions) for split, number, positions in plan if shard_path(split, number).is_dir())
    total = sum(len(positions) for _, _, positions in plan)
    with tqdm(total=total, initial=done, desc=f"tokenizing {source}", unit="img", disable=not progress) as bar:
        for split, number, positions in plan:
            final = shard_path(split, number)
            if final.is_dir():
                continue
            rows = _encode_shard(
                tok, Subset(image_sets[split], positions), batch_size, flip_augment and split == "train",
                num_workers, bar,
            )
            temp = final.with_name(final.name + ".partial")
            shutil.rmtree(temp, ignore_errors=True)
            with _quiet_datasets():  # one "Saving the dataset" bar per shard would bury the tokenizing bar
                datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(temp))
            temp.rename(final)

    assembled = datasets.DatasetDict(
        {
            split: datasets.concatenate_datasets(
                [datasets.load_from_disk(str(shard_path(split, number)))
                 for s, number, _ in plan if s == split]
            )
            for split in splits
        }
    )
    with _quiet_datasets():
        assembled.save_to_disk(str(output))
    info = TokenDatasetInfo(
        tokenizer=tokenizer_name,
        tokenizer_hash=fingerprint,
        codebook_size=codebook_size,
        grid_size=list(grid),
        image_size=image_size,
        source=source,
        flip_augment=bool(flip_augment),
        attribute_names=attribute_names,
        num_classes_per_attribute=num_classes_per_attribute,
        num_rows={split: len(assembled[split]) for split in splits},
        job=job,
    )
    info.save(output)
    shutil.rmtree(shard_root)
    return load_token_dataset(output)
