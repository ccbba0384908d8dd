"""Stage-one data: synthetic-faces caching and splits, lfw-subset, image folders with bad files, the Hub
error path, transforms, loaders and image grids."""

import hashlib

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import stage1_tokenizer.synthetic_faces as synthetic_faces
from stage1_tokenizer.data import (
    SPLITS,
    build_transform,
    load_image_dataset,
    make_dataloader,
    save_image_grid,
    split_range,
    split_sizes,
)


def test_split_sizes_are_75_10_15_and_ranges_tile_the_items():
    assert split_sizes(20_000) == {"train": 15_000, "validation": 2_000, "test": 3_000}
    assert split_sizes(100) == {"train": 75, "validation": 10, "test": 15}
    for total in (7, 40, 101):
        positions = [i for split in SPLITS for i in split_range(total, split)]
        assert positions == list(range(total))


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def test_synthetic_faces_items_are_the_rendered_faces_with_their_attributes(synthetic_cache):
    dataset = load_image_dataset("synthetic-faces", "validation", 32, num_images=40, seed=5, cache_dir=synthetic_cache)
    assert len(dataset) == 4
    assert dataset.attribute_names == list(synthetic_faces.ATTRIBUTE_NAMES)
    classes = synthetic_faces.NUM_CLASSES_PER_ATTRIBUTE
    assert dataset.num_classes_per_attribute == [classes[n] for n in dataset.attribute_names]
    for position, index in enumerate(dataset.table["index"]):
        item = dataset[position]
        pixels, attributes = synthetic_faces.render_face(5, index, 32)
        expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 32, 32)
        torch.testing.assert_close(item["pixel_values"], expected, atol=1e-5, rtol=0)
        assert item["labels"].dtype == torch.long
        assert item["labels"].tolist() == [int(attributes[n]) for n in dataset.attribute_names]


def test_synthetic_splits_are_disjoint_and_sized_75_10_15(synthetic_cache):
    indices = {}
    for split in SPLITS:
        dataset = load_image_dataset("synthetic-faces", split, 32, num_images=40, cache_dir=synthetic_cache)
        indices[split] = set(dataset.table["index"])
    assert {split: len(v) for split, v in indices.items()} == {"train": 30, "validation": 4, "test": 6}
    assert set().union(*indices.values()) == set(range(40))


def test_synthetic_cache_is_reused_and_keyed_by_seed(synthetic_cache, monkeypatch):
    load_image_dataset("synthetic-faces", "test", 32, num_images=40, seed=1, cache_dir=synthetic_cache)
    calls = []
    real_render = synthetic_faces.render_face

    def counting_render(*args, **kwargs):
        calls.append(args)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic_faces, "render_face", counting_render)
    again = load_image_dataset("synthetic-faces", "test", 32, num_images=40, seed=1, cache_dir=synthetic_cache)
    assert len(again) == 6 and calls == []
    load_image_dataset("synthetic-faces", "test", 32, num_images=40, seed=2, cache_dir=synthetic_cache)
    assert len(calls) == 6


def test_unknown_split_and_bad_sizes_raise(synthetic_cache):
    with pytest.raises(ValueError, match="unknown split"):
        load_image_dataset("synthetic-faces", "val", 32, num_images=40, cache_dir=synthetic_cache)
    with pytest.raises(ValueError, match="at least 32"):
        load_image_dataset("synthetic-faces", "train", 16, num_images=40, cache_dir=synthetic_cache)
    with pytest.raises(ValueError, match="num_images"):
        load_image_dataset("synthetic-faces", "train", 32, num_images=0, cache_dir=synthetic_cache)


def test_lfw_subset_has_100_faces_in_disjoint_75_10_15_splits_as_rgb(tmp_path):
    digests = {}
    for split in SPLITS:
        dataset = load_image_dataset("lfw-subset", split, 32, cache_dir=str(tmp_path))
        digests[split] = {hashlib.sha1(row["image"]["bytes"]).hexdigest() for row in dataset.table}
        item = dataset[0]["pixel_values"]
        assert item.shape == (3, 32, 32) and dataset.attribute_names == []
        assert dataset[0]["labels"].shape == (0,)
        torch.testing.assert_close(item[0], item[1])  # grayscale became three equal channels
        assert item.min() >= -1.0 and item.max() <= 1.0 and item.max() - item.min() > 0.5
    assert {s: len(d) for s, d in digests.items()} == {"train": 75, "validation": 10, "test": 15}
    assert len(set().union(*digests.values())) == 100


def write_png(path, array, mode=None):
    PIL.Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    """train/ holds 4 good RGB images, an RGBA, a grayscale, a corrupt, a tiny and a truncated file;
    validation/ and test/ one good image each."""
    rng = np.random.default_rng(0)
    for split in SPLITS:
        (tmp_path / "images" / split).mkdir(parents=True)
    train = tmp_path / "images" / "train"
    for i in range(4):
        write_png(train / f"good{i}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255
    rgba[:, 20:, 3] = 255  # left half transparent (should turn white), right half opaque red
    write_png(train / "rgba.png", rgba)
    write_png(train / "gray.png", np.full((40, 40), 90, dtype=np.uint8))
    (train / "corrupt.png").write_bytes(b"this is not a png file at all")
    write_png(train / "tiny.png", np.zeros((4, 4, 3), dtype=np.uint8))
    write_png(train / "full.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (train / "full.png").read_bytes()
    (train / "full.png").unlink()
    (train / "truncated.png").write_bytes(data[: len(data) // 2])
    for split in ("validation", "test"):
        write_png(tmp_path / "images" / split / "one.png", np.full((40, 40, 3), 200, dtype=np.uint8))
    return tmp_path


def test_image_folder_skips_bad_files_with_a_count_and_converts_the_rest(messy_folder):
    dataset = load_image_dataset(str(messy_folder / "images"), "train", 32, cache_dir=str(messy_folder / "cache"))
    assert len(dataset) == 7  # 9 files minus the corrupt and the tiny one, found before training
    assert dataset.skipped_at_load == 2
    items = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert dataset.num_skipped == 3  # the truncated file is met, skipped and counted while iterating
    assert all(item.shape == (3, 32, 32) for item in items)
    white = torch.ones(3, 32, 8)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 32, 8)
    assert any(torch.equal(item[:, :, :8], white) and torch.equal(item[:, :, -8:], red) for item in items)
    gray_value = 90 / 127.5 - 1.0
    assert any(torch.allclose(item, torch.full_like(item, gray_value), atol=1e-5) for item in items)
    assert len(load_image_dataset(str(messy_folder / "images"), "test", 32, cache_dir=str(messy_folder / "cache"))) == 1


def test_image_folder_without_splits_is_carved_75_10_15_with_class_labels(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i in range(10):
            write_png(tmp_path / "pets" / label / f"{i}.png", np.full((24, 24, 3), i * 20, dtype=np.uint8))
    paths = {}
    for split in SPLITS:
        dataset = load_image_dataset(str(tmp_path / "pets"), split, 16, cache_dir=str(tmp_path / "cache"))
        paths[split] = {row["image"]["path"] for row in dataset.table}
        assert dataset.attribute_names == ["label"] and dataset.num_classes_per_attribute == [2]
        assert dataset[0]["labels"].shape == (1,)
    assert {s: len(p) for s, p in paths.items()} == {"train": 15, "validation": 2, "test": 3}
    assert len(set().union(*paths.values())) == 20


def test_empty_or_unusable_folders_fail_at_load_with_a_helpful_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        load_image_dataset(str(tmp_path / "empty"), "train", 32, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no usable images"):
        load_image_dataset(str(tmp_path / "bad"), "train", 32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not an existing folder"):
        load_image_dataset(str(tmp_path / "missing"), "train", 32, cache_dir=str(tmp_path / "cache"))


def test_unreachable_hub_id_says_how_to_use_a_local_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/celeba-hq' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="local folder") as error:
        load_image_dataset("someone/celeba-hq", "train", 64, cache_dir=str(tmp_path))
    assert "someone/celeba-hq" in str(error.value) and "synthetic-faces" in str(error.value)


def test_transform_resizes_the_shorter_side_and_centre_crops():
    stripes = np.zeros((40, 80, 3), dtype=np.uint8)
    stripes[:, :20, 0] = 255  # red left quarter, cropped away
    stripes[:, 20:60, 1] = 255  # green middle half, kept
    stripes[:, 60:, 2] = 255  # blue right quarter, cropped away
    out = build_transform(16)(PIL.Image.fromarray(stripes))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[:, :, 2:-2], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 12))


def test_random_flip_yields_the_image_or_its_mirror():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    plain = build_transform(16)(image)
    torch.manual_seed(0)
    outputs = [build_transform(16, random_flip=True)(image) for _ in range(12)]
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outputs)
    assert any(torch.equal(o, plain.flip(-1)) for o in outputs) and any(torch.equal(o, plain) for o in outputs)


def test_dataloader_order_follows_the_seed(synthetic_cache):
    dataset = load_image_dataset("synthetic-faces", "train", 32, num_images=40, cache_dir=synthetic_cache)
    first = [b["labels"] for b in make_dataloader(dataset, 8, shuffle=True, seed=3, drop_last=True)]
    again = [b["labels"] for b in make_dataloader(dataset, 8, shuffle=True, seed=3, drop_last=True)]
    assert len(first) == 3 and first[0].shape == (8, 7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_dataloader(dataset, 64, shuffle=True, seed=0, drop_last=True)


def test_save_image_grid_lays_images_out_in_rows(tmp_path):
    images = torch.full((6, 3, 8, 8), -1.0)
    images[4] = 1.0  # the fifth image (row 1, column 1) is white
    save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    grid = np.asarray(PIL.Image.open(tmp_path / "sub" / "grid.png"))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 2 px padding around 8 px tiles
    assert (grid[12:20, 12:20] == 255).all() and (grid[2:10, 2:10] == 0).all()
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(3, 8, 8), tmp_path / "bad.png")
