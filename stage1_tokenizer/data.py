"""Image datasets for stage one, from four kinds of source behind one loader.

``load_image_dataset(source, split, image_size)`` takes

- ``"synthetic-faces"``: procedural faces (:mod:`stage1_tokenizer.synthetic_faces`), rendered once per
  (seed, size, count, split) and cached on disk as an Arrow dataset;
- ``"lfw-subset"``: the 100 real 25 x 25 grayscale faces that scikit-image ships;
- a path to a local folder of images (the ``datasets`` "imagefolder" builder: class sub-folders become
  labels, ``train/``, ``validation/``, ``test/`` sub-folders become splits);
- a Hugging Face Hub dataset id.

Every source comes out as an :class:`ImageDataset` whose items are
``{"pixel_values": float32 [3, S, S] in [-1, 1], "labels": long [len(attribute_names)]}``.
Splits are 75/10/15 as in the paper (Sec. "What the paper measured" of METHOD.md), deterministic.
A file that cannot be read or is too small is skipped and counted, never fatal mid-epoch; a source with
no usable image fails at load time, before any training step, with a ValueError that says what to do.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow.compute
import torch
import torchvision.utils
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from . import synthetic_faces

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.75, "validation": 0.10, "test": 0.15}
# Names under which a source's own splits may go; a source needs all three for them to be used.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
BUILTIN_SOURCES = ("synthetic-faces", "lfw-subset")
DEFAULT_SYNTHETIC_COUNT = 20_000
DEFAULT_CACHE_DIR = Path("~/.cache/driftvq/datasets")
# Sources without their own splits are split by a fixed permutation, independent of `seed`: every run,
# whatever its seed, must keep the same test images out of training.
SPLIT_PERMUTATION_SEED = 0
# An image whose shorter side is below image_size / MIN_SIDE_DIVISOR would be upsampled into a blur.
MIN_SIDE_DIVISOR = 4
_IMAGE_COLUMN_NAMES = ("image", "img")
_LABEL_COLUMN_NAMES = ("label", "labels", "class")
_SYNTHETIC_BATCH = 500
# Below this many images a worker pool costs more to start than it saves.
_PARALLEL_RENDER_MIN = 2_000
_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


# -- splits ---------------------------------------------------------------------------------------
def split_sizes(total: int) -> dict[str, int]:
    """Sizes of the train/validation/test splits of ``total`` items (75/10/15; test takes the rounding)."""
    train = round(total * SPLIT_FRACTIONS["train"])
    validation = round(total * SPLIT_FRACTIONS["validation"])
    return {"train": train, "validation": validation, "test": total - train - validation}


def split_range(total: int, split: str) -> range:
    """Positions of ``split`` among ``total`` items: consecutive blocks in the order train, validation, test."""
    _check_split(split)
    sizes = split_sizes(total)
    start = sum(sizes[s] for s in SPLITS[: SPLITS.index(split)])
    return range(start, start + sizes[split])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")


# -- decoding and transforms ------------------------------------------------------------------------
def build_transform(image_size: int, random_flip: bool = False) -> v2.Compose:
    """PIL RGB image -> float32 ``[3, S, S]`` in [-1, 1]: shorter side resized to S, centre crop, optional flip."""
    steps = [v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]
    return v2.Compose(steps)


def _open_image(value: dict) -> PIL.Image.Image:
    """Open a ``datasets`` Image value (``{"bytes", "path"}``) lazily: only the header is read."""
    if value.get("bytes") is not None:
        return PIL.Image.open(io.BytesIO(value["bytes"]))
    if value.get("path"):
        return PIL.Image.open(value["path"])
    raise ValueError("image entry has neither bytes nor a path")


def decode_rgb(value: dict) -> PIL.Image.Image:
    """Fully decode an image and convert it to 8-bit RGB.

    Transparent images are composited on white (dropping alpha would expose whatever colour the
    transparent pixels happen to store); 16-bit grayscale is scaled, not clipped, to 8 bits; camera
    photos are turned upright by their EXIF orientation. Raises OSError/ValueError on corrupt data.
    """
    with _open_image(value) as image:
        image.load()  # a truncated file passes the header check and fails here
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit grayscale opens as "I;16" (older Pillow: "I")
            levels = np.asarray(image, dtype=np.float32) / 257.0
            image = PIL.Image.fromarray(np.round(levels).clip(0, 255).astype(np.uint8))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def _usable_images(batch: dict, image_column: str, min_side: int) -> list[bool]:
    """Header check for ``datasets.filter``: the file opens as an image and its shorter side >= min_side."""
    keep = []
    for value in batch[image_column]:
        try:
            with _open_image(value) as image:
                side = min(image.size)
            ok = side >= min_side
            if not ok:
                logger.warning("skipping %s: %d px on its shorter side, below %d", _describe(value), side, min_side)
        except _READ_ERRORS as error:
            logger.warning("skipping %s: not a readable image (%s)", _describe(value), error)
            ok = False
        keep.append(ok)
    return keep


def _describe(value: dict) -> str:
    return value.get("path") or "an embedded image"


# -- the dataset --------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """A split of an image source as a torch Dataset.

    Args:
        table: the ``datasets.Dataset`` behind it; its image column is read undecoded and decoded here.
        image_column: name of the image column of ``table``.
        label_columns: columns that become the label vector, in order.
        num_classes_per_attribute: number of classes of each label column.
        transform: PIL RGB image -> float tensor ``[3, S, S]``.
        name: source and split, for messages.
        skipped_at_load: images already dropped while loading (unreadable header or too small).

    Items are ``{"pixel_values": float32 [3, S, S] in [-1, 1], "labels": long [len(attribute_names)]}``.
    An image that fails to decode here (e.g. a truncated file) is replaced by the next readable one and
    counted in ``num_skipped``, so one bad file cannot end an epoch.
    """

    def __init__(
        self,
        table: datasets.Dataset,
        image_column: str,
        label_columns: list[str],
        num_classes_per_attribute: list[int],
        transform: v2.Compose,
        name: str,
        skipped_at_load: int = 0,
    ):
        self.table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.attribute_names = list(label_columns)
        self.num_classes_per_attribute = list(num_classes_per_attribute)
        self.transform = transform
        self.name = name
        self.skipped_at_load = skipped_at_load
        self._unreadable: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """Images left out so far: at load time, and unreadable ones met by ``__getitem__`` in this process."""
        return self.skipped_at_load + len(self._unreadable)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.table)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} with {n} images")
        row, image = self.read(index % n)
        labels = torch.tensor([int(row[c]) for c in self.attribute_names], dtype=torch.long)
        return {"pixel_values": self.transform(image), "labels": labels}

    def read(self, index: int) -> tuple[dict, PIL.Image.Image]:
        """The row at ``index`` and its decoded RGB image, or those of the next readable row after it.

        Raises:
            ValueError: no row of the dataset can be decoded.
        """
        n = len(self.table)
        for offset in range(n):
            position = (index + offset) % n
            if position in self._unreadable:
                continue
            row = self.table[position]
            try:
                return row, decode_rgb(row[self.image_column])
            except _READ_ERRORS as error:
                self._unreadable.add(position)
                logger.warning(
                    "%s: skipping unreadable image %s (%s); %d skipped so far",
                    self.name, _describe(row[self.image_column]), error, self.num_skipped,
                )
        raise ValueError(
            f"{self.name}: none of its {n} images could be decoded (all corrupt or truncated); "
            "check the files or use another source"
        )


# -- sources --------------------------------------------------------------------------------------
def load_image_dataset(
    source: str,
    split: str = "train",
    image_size: int = 64,
    num_images: int | None = None,
    seed: int = 0,
    random_flip: bool = False,
    cache_dir: str | None = None,
) -> ImageDataset:
    """Load one split of an image source.

    Args:
        source: ``"synthetic-faces"``, ``"lfw-subset"``, a path to a local image folder, or a Hub dataset id.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        image_size: S; images are resized (shorter side) and centre-cropped to S x S.
        num_images: size of the whole source across its three splits; the split gets its 75/10/15 share.
            synthetic-faces renders this many (default 20,000); other sources keep a fixed subset of this
            many (default: all).
        seed: the synthetic-faces generator seed. Other sources ignore it: their split permutation is
            fixed, so that runs with different seeds share one test set.
        random_flip: random horizontal flips (training augmentation).
        cache_dir: where generated and downloaded datasets are cached (default ``~/.cache/driftvq/datasets``).

    Returns:
        An :class:`ImageDataset`; ``.attribute_names`` and ``.num_classes_per_attribute`` describe its labels.

    Raises:
        ValueError: unknown split, bad size, an unreachable Hub id, or a source with no usable image.
    """
    _check_split(split)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"num_images must be a positive integer or None, got {num_images!r}")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    transform = build_transform(image_size, random_flip)
    name = f"{source} [{split}]"
    min_side = 0
    if source == "synthetic-faces":
        if image_size < synthetic_faces.MIN_SIZE:
            raise ValueError(
                f"synthetic-faces renders at least {synthetic_faces.MIN_SIZE} px, got image_size={image_size}"
            )
        table = synthetic_faces_split(split, image_size, num_images or DEFAULT_SYNTHETIC_COUNT, seed, cache)
    elif source == "lfw-subset":
        # 25 px faces are upsampled on purpose here, so the too-small rule does not apply.
        table = _carve_split(_lfw_subset_table(), split, num_images)
    else:
        table = _external_split(source, split, num_images, cache)
        min_side = math.ceil(image_size / MIN_SIDE_DIVISOR)

    image_column = _find_image_column(table, source)
    skipped = 0
    if min_side:
        table = table.cast_column(image_column, datasets.Image(decode=False))
        before = len(table)
        table = table.filter(
            _usable_images, batched=True, fn_kwargs={"image_column": image_column, "min_side": min_side},
            desc=f"checking images of {name}",
        )
        skipped = before - len(table)
        if skipped:
            logger.warning(
                "%s: skipped %d of %d images (unreadable, or shorter side < %d px)", name, skipped, before, min_side
            )
    if len(table) == 0:
        raise ValueError(
            f"{name} has no usable images ({skipped} skipped as unreadable or smaller than {min_side} px); "
            "check the files, lower image_size, or use another source such as 'synthetic-faces'"
        )
    label_columns, num_classes = _find_label_columns(table, image_column)
    dataset = ImageDataset(table, image_column, label_columns, num_classes, transform, name, skipped)
    dataset.read(0)  # decode one image now: a source whose files are all corrupt fails before training starts
    return dataset


def synthetic_faces_split(split: str, image_size: int, count: int, seed: int, cache: Path) -> datasets.Dataset:
    """One split of the synthetic faces, rendered on first use and cached as an Arrow dataset on disk.

    The cache is keyed by (renderer version, seed, size, count) and split; the split holds the faces at the
    indices ``split_range(count, split)``, so splits are disjoint by construction.
    """
    key = f"v{synthetic_faces.RENDERER_VERSION}-seed{seed}-size{image_size}-n{count}"
    folder = cache / "synthetic-faces" / key / split
    if (folder / "dataset_info.json").exists():
        return datasets.load_from_disk(str(folder))
    indices = split_range(count, split)
    if len(indices) == 0:
        raise ValueError(f"num_images={count} leaves the {split} split of synthetic-faces empty; use more images")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "index": datasets.Value("int64"),
            **{name: datasets.ClassLabel(names=_class_names(name)) for name in synthetic_faces.ATTRIBUTE_NAMES},
        }
    )
    batches = [indices[i : i + _SYNTHETIC_BATCH] for i in range(0, len(indices), _SYNTHETIC_BATCH)]
    jobs = [(seed, batch.start, batch.stop, image_size) for batch in batches]
    description = f"rendering synthetic-faces {split} ({len(indices)} x {image_size} px)"
    parts = []
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if len(indices) >= _PARALLEL_RENDER_MIN and workers > 1:
        with multiprocessing.Pool(workers) as pool:
            for rows in tqdm(pool.imap(_render_rows, jobs), total=len(jobs), desc=description):
                parts.append(datasets.Dataset.from_dict(rows, features=features))
    else:
        for job in tqdm(jobs, desc=description):
            parts.append(datasets.Dataset.from_dict(_render_rows(job), features=features))
    table = datasets.concatenate_datasets(parts)
    # Write beside the target and rename: an interrupted run must not leave a cache that looks complete,
    # and two processes rendering the same split at once (one per GPU) must not write into one folder.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    table.save_to_disk(str(partial))
    if folder.exists() and not (folder / "dataset_info.json").exists():
        shutil.rmtree(folder)  # left by an older, interrupted writer
    try:
        partial.rename(folder)
    except OSError:  # another process finished the same split first; its copy is identical
        shutil.rmtree(partial)
    return datasets.load_from_disk(str(folder))


def _class_names(attribute: str) -> list[str]:
    return {
        "hair_colour": list(synthetic_faces.HAIR_COLOURS),
        "hair_style": list(synthetic_faces.HAIR_STYLES),
        "skin_tone": list(synthetic_faces.SKIN_TONES),
        "eye_colour": list(synthetic_faces.EYE_COLOURS),
    }.get(attribute, ["no", "yes"])


def _render_rows(job: tuple[int, int, int, int]) -> dict[str, list]:
    """Render faces ``start..stop`` as PNG bytes plus attribute columns (a worker-pool task)."""
    seed, start, stop, size = job
    rows: dict[str, list] = {"image": [], "index": [], **{name: [] for name in synthetic_faces.ATTRIBUTE_NAMES}}
    for index in range(start, stop):
        pixels, attributes = synthetic_faces.render_face(seed, index, size)
        buffer = io.BytesIO()
        # Level 1: these flat-shaded pictures compress well already; higher levels only cost time.
        PIL.Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["index"].append(index)
        for name, value in attributes.items():
            rows[name].append(int(value))
    return rows


def _lfw_subset_table() -> datasets.Dataset:
    """scikit-image's LFW subset: its first 100 entries are faces (the other 100 are non-faces)."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]
    images = [PIL.Image.fromarray(np.round(face * 255.0).astype(np.uint8), mode="L") for face in faces]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def _carve_split(table: datasets.Dataset, split: str, num_images: int | None) -> datasets.Dataset:
    """The 75/10/15 share of ``split`` of a fixed permutation of ``table`` (first ``num_images`` of it)."""
    order = np.random.default_rng(SPLIT_PERMUTATION_SEED).permutation(len(table))
    if num_images is not None:
        order = order[:num_images]
    positions = split_range(len(order), split)
    return table.select(order[positions.start : positions.stop])


def _external_split(source: str, split: str, num_images: int | None, cache: Path) -> datasets.Dataset:
    """A split of a local image folder or a Hub dataset.

    The source's own splits if it has all three; otherwise 75/10/15 carved out of its "train" split (or of
    its only split), so that the three splits never overlap.
    """
    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            splits = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache / "imagefolder"))
        except FileNotFoundError as error:
            raise ValueError(
                f"no image files found in folder {folder} ({error}); put .png/.jpg/... images in it (class "
                "sub-folders give labels, train/validation/test sub-folders give splits) or use another source"
            ) from error
    elif folder.exists() or source.startswith((".", "~", os.sep)):
        raise ValueError(
            f"{source!r} is not an existing folder; give a folder of images, a Hub id or a built-in source"
        )
    else:
        splits = _load_from_hub(source, cache)

    own = {name: next((alias for alias in SPLIT_ALIASES[name] if alias in splits), None) for name in SPLITS}
    if all(own.values()):
        table = splits[own[split]]
        if num_images is not None:
            table = table.select(range(min(len(table), split_sizes(num_images)[split])))
        return table
    whole = splits["train"] if "train" in splits else splits[sorted(splits)[0]]
    return _carve_split(whole, split, num_images)


def _load_from_hub(source: str, cache: Path) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(source, cache_dir=str(cache / "hub"))
    except (ConnectionError, FileNotFoundError) as error:
        raise ValueError(
            f"could not load {source!r}: it is not a built-in source ({', '.join(BUILTIN_SOURCES)}), not an "
            f"existing folder, and the Hugging Face Hub did not provide it ({type(error).__name__}: {error}). "
            "Offline, download the dataset on a machine with internet and pass the path of a local folder of "
            "images instead (class sub-folders give labels; train/validation/test sub-folders give splits), "
            "or use 'synthetic-faces'"
        ) from error


def _find_image_column(table: datasets.Dataset, source: str) -> str:
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in _IMAGE_COLUMN_NAMES:
        if name in table.column_names:
            return name
    raise ValueError(
        f"{source} has no image column (columns: {table.column_names}); expected an Image feature or a "
        f"column named one of {list(_IMAGE_COLUMN_NAMES)}"
    )


def _find_label_columns(table: datasets.Dataset, image_column: str) -> tuple[list[str], list[int]]:
    """Class-label columns, yes/no columns and integer columns named like a label, with their class counts.

    A column with missing values is not a label: imagefolder, for one, adds an all-None "label" column
    when the only sub-folders are train/validation/test.
    """
    names, classes = [], []
    columns = table.with_format("arrow")  # whole columns at once; row-wise iteration costs seconds per 10k rows
    for name, feature in table.features.items():
        if name == image_column or not isinstance(feature, (datasets.ClassLabel, datasets.Value)):
            continue
        if columns[name].null_count:
            continue
        if isinstance(feature, datasets.ClassLabel):
            count = feature.num_classes
        elif feature.dtype == "bool":
            count = 2
        elif feature.dtype.startswith(("int", "uint")) and name.lower() in _LABEL_COLUMN_NAMES:
            count = (pyarrow.compute.max(columns[name]).as_py() or 0) + 1
        else:
            continue
        names.append(name)
        classes.append(count)
    return names, classes


# -- loaders and pictures -------------------------------------------------------------------------
def make_dataloader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed``.

    Raises:
        ValueError: ``batch_size`` < 1, or ``drop_last`` with fewer images than one batch (the loader would be
            empty and a training loop over it would silently do nothing).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} with drop_last=True; "
            "lower batch_size or use more images"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save a batch of images in [-1, 1] (``[B, 3, H, W]``) as one PNG grid, ``nrow`` images per row."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape [B, 3, H, W] (or [B, 1, H, W]), got {shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pixels = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    torchvision.utils.save_image(pixels, str(path), nrow=nrow, padding=2)
