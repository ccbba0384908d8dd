"""Token-grid datasets: exact round trip against direct encoding, flips, tokenizer checks, resumption."""

import pytest
import torch

import stage2_prior.token_dataset as token_dataset
from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.data import load_image_dataset
from stage2_prior import load_token_dataset, tokenize_dataset, tokenizer_fingerprint
from helpers import random_tiny_tokenizer

NUM_IMAGES = 24  # 18 train, 2 validation, 4 test images
SIZE = 32


def tiny_tokenizer(seed=0):
    return random_tiny_tokenizer(seed)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("image-cache"))


def encode_directly(tok, split, cache_dir, flip=False):
    images = load_image_dataset("synthetic-faces", split, SIZE, num_images=NUM_IMAGES, cache_dir=cache_dir)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    labels = torch.stack([images[i]["labels"] for i in range(len(images))])
    if flip:
        pixels = pixels.flip(-1)
    return tok.encode(pixels).reshape(len(images), -1), labels


def make(tok, out, cache_dir, **kwargs):
    args = dict(image_size=SIZE, batch_size=5, num_images=NUM_IMAGES, cache_dir=cache_dir, progress=False)
    args.update(kwargs)
    return tokenize_dataset(tok, "synthetic-faces", out, **args)


def test_round_trip_matches_direct_encoding(tmp_path, cache_dir):
    tok = tiny_tokenizer()
    made = make(tok, tmp_path / "tokens", cache_dir, shard_size=7)
    loaded = load_token_dataset(tmp_path / "tokens", expected_tokenizer=tok)
    assert loaded.info.grid_size == [8, 8] and loaded.info.codebook_size == 16
    assert loaded.info.tokenizer_hash == tokenizer_fingerprint(tok)
    assert loaded.info.num_rows == {"train": 18, "validation": 2} == {k: len(v) for k, v in made.splits.items()}
    assert loaded.info.attribute_names[0] == "smiling"
    assert str(loaded["train"].features["tokens"].feature.dtype) == "int16"
    for split in ("train", "validation"):
        table = loaded[split].with_format("torch")[:]
        codes, labels = encode_directly(tok, split, cache_dir)
        assert torch.equal(table["tokens"].long(), codes)
        assert torch.equal(table["labels"], labels)
        assert table["index"].tolist() == list(range(len(codes)))
    assert not (tmp_path / "tokens" / "shards").exists()


def test_flip_augment_adds_mirrored_training_copies_only(tmp_path, cache_dir):
    tok = tiny_tokenizer()
    loaded = make(tok, tmp_path / "tokens", cache_dir, flip_augment=True)
    train = loaded["train"].with_format("torch")[:]
    assert len(train["tokens"]) == 36 and len(loaded["validation"]) == 2
    flipped = train["flipped"]
    codes, _ = encode_directly(tok, "train", cache_dir, flip=True)
    order = train["index"][flipped].argsort()
    assert torch.equal(train["tokens"][flipped][order].long(), codes)
    assert not loaded["validation"].with_format("torch")[:]["flipped"].any()


def test_fingerprint_survives_save_load_and_tells_tokenizers_apart(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(VQTokenizer.from_pretrained(tmp_path / "tok")) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tiny_tokenizer(seed=1)) != tokenizer_fingerprint(tok)


def test_tokens_of_another_tokenizer_are_refused(tmp_path, cache_dir):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    make(str(tmp_path / "tok"), tmp_path / "tokens", cache_dir, splits=("validation",))
    info = load_token_dataset(tmp_path / "tokens", expected_tokenizer=str(tmp_path / "tok")).info
    assert info.tokenizer == str(tmp_path / "tok")
    with pytest.raises(ValueError, match="Re-encode"):
        load_token_dataset(tmp_path / "tokens", expected_tokenizer=tiny_tokenizer(seed=1))
    with pytest.raises(ValueError, match="fingerprint"):
        load_token_dataset(tmp_path / "tokens", expected_tokenizer_hash="0123456789abcdef")


def test_interrupted_run_resumes_from_finished_shards(tmp_path, cache_dir, monkeypatch):
    tok = tiny_tokenizer()
    reference = make(tok, tmp_path / "reference", cache_dir, shard_size=4)

    real_encode = token_dataset._encode_shard
    calls = []

    def crash_on_third_shard(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(token_dataset, "_encode_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        make(tok, tmp_path / "tokens", cache_dir, shard_size=4)
    with pytest.raises(ValueError, match="interrupted run"):
        make(tok, tmp_path / "tokens", cache_dir, shard_size=5)

    def count_shards(*args, **kwargs):
        calls.append(len(args[1]))
        return real_encode(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(token_dataset, "_encode_shard", count_shards)
    resumed = make(tok, tmp_path / "tokens", cache_dir, shard_size=4)
    # Train: 18 images = shards of 4, 4, 4, 4, 2; validation: one shard of 2. The first two train shards
    # were finished before the crash, so only the other four are encoded now.
    assert calls == [4, 4, 2, 2]
    for split in ("train", "validation"):
        assert resumed[split][:] == reference[split][:]
    with pytest.raises(ValueError, match="other arguments"):
        make(tok, tmp_path / "tokens", cache_dir, shard_size=4, flip_augment=True)
