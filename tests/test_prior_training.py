"""Prior training: exact resume, conditional training and validation, tokenizer checks, the NaN guard,
batch bookkeeping, and (slow) two processes under accelerate launch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import stage2_prior.training as training
from stage1_tokenizer.checkpoints import NonFiniteLossError
from stage2_prior import ImageTokenPrior, build_prior, load_token_dataset, tokenize_dataset
from stage2_prior.conditioning import AttributeClasses
from stage2_prior.training import MicroBatches, PriorTrainingConfig, train_prior
from helpers import random_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_tokenizer(seed=0):
    return random_tiny_tokenizer(seed)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """40 synthetic faces at 32 px (30 train, 4 validation) as 8 x 8 grids of a random 16-code tokenizer."""
    root = tmp_path_factory.mktemp("prior-data")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tokenize_dataset(tokenizer, "synthetic-faces", root / "tokens", image_size=32, batch_size=20, num_images=40,
                     cache_dir=str(root / "images"), progress=False)
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerator state is a per-process singleton; tests in one process must not inherit each other's.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def tiny_config(tokens, output_dir, **overrides):
    values = dict(
        token_dataset=str(tokens / "tokens"), hidden_size=32, num_layers=2, num_heads=2, prior_size="tiny",
        max_steps=6, batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, lr_warmup_steps=2,
        mixed_precision="no", checkpoint_every=3, eval_every=3, eval_batch_size=3, report_to="none",
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return PriorTrainingConfig(**values)


def test_resume_after_crash_reproduces_the_uninterrupted_run(tokens, tmp_path, monkeypatch):
    reference = train_prior(tiny_config(tokens, tmp_path / "reference"))
    assert len(reference["losses"]) == 6

    real_save = training.CheckpointManager.save

    def crash_after_step_3(self, step, *args, **kwargs):
        path = real_save(self, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(training.CheckpointManager, "save", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_prior(tiny_config(tokens, tmp_path / "run"))
    monkeypatch.setattr(training.CheckpointManager, "save", real_save)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train_prior(tiny_config(tokens, tmp_path / "run", resume_from_checkpoint="latest"))

    assert resumed["start_step"] == 3 and resumed["step"] == 6
    assert resumed["losses"] == reference["losses"][3:]
    assert resumed["validation"] == reference["validation"]
    a = ImageTokenPrior.from_pretrained(reference["prior_path"]).state_dict()
    b = ImageTokenPrior.from_pretrained(resumed["prior_path"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conditional_training_records_classes_and_validates_in_bits(tokens, tmp_path):
    cfg = tiny_config(tokens, tmp_path / "out", class_attributes=["smiling", "glasses"], label_dropout=0.5, max_steps=2)
    result = train_prior(cfg)
    prior = ImageTokenPrior.from_pretrained(result["prior_path"]).eval()
    data = load_token_dataset(cfg.token_dataset)
    assert prior.num_classes == 4 and prior.config.class_names[3] == "smiling=1,glasses=1"
    assert prior.config.tokenizer_hash == data.info.tokenizer_hash
    assert list(prior.grid_size) == data.info.grid_size

    # Reference: the mean loss over every validation code, in one batch, with the true class labels.
    table = data["validation"].with_format("torch")[:]
    classes = AttributeClasses.from_names(cfg.class_attributes, data.info.attribute_names,
                                          data.info.num_classes_per_attribute)
    with torch.no_grad():
        expected = prior.grid_loss(table["tokens"].long(), classes.class_ids(table["labels"])).item()
    validation = result["validation"]
    assert validation["loss"] == pytest.approx(expected, rel=1e-5)
    assert validation["bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-5)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["step"] == 2


def test_attribute_classes_number_combinations_in_mixed_radix():
    classes = AttributeClasses.from_names(["hair", "smiling"], ["smiling", "glasses", "hair"], [2, 2, 3])
    labels = torch.tensor([[0, 1, 0], [1, 0, 0], [1, 1, 2]])  # (hair, smiling) = (0, 0), (0, 1), (2, 1)
    assert classes.num_classes == 6
    assert classes.class_ids(labels).tolist() == [0, 1, 5]
    assert classes.class_names()[5] == "hair=2,smiling=1"
    with pytest.raises(ValueError, match="not labelled"):
        AttributeClasses.from_names(["beard"], ["smiling"], [2])


def test_tokens_of_another_tokenizer_are_refused(tokens, tmp_path):
    other = tiny_tokenizer(seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="Re-encode"):
        train_prior(tiny_config(tokens, tmp_path / "a", expected_tokenizer=str(tmp_path / "other")))
    foreign = build_prior(16, (8, 8), hidden_size=32, num_layers=1, num_heads=2, tokenizer_hash="0000000000000000")
    foreign.save_pretrained(tmp_path / "foreign")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="fingerprint"):
        train_prior(tiny_config(tokens, tmp_path / "b", init_from=str(tmp_path / "foreign")))


def test_nan_loss_stops_the_run(tokens, tmp_path):
    info = load_token_dataset(tokens / "tokens").info
    broken = build_prior(16, (8, 8), hidden_size=32, num_layers=2, num_heads=2, tokenizer_hash=info.tokenizer_hash)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train_prior(tiny_config(tokens, tmp_path / "out", init_from=str(tmp_path / "broken")))


def test_micro_batches_partition_each_epoch_across_processes():
    shards = [MicroBatches(23, 3, 2, p, seed=5) for p in range(2)]  # 3 global batches of 6 per epoch
    for epoch in range(2):
        rows = torch.cat([s.rows(epoch * 3 + k) for k in range(3) for s in shards])
        assert rows.numel() == 18 and rows.unique().numel() == 18 and int(rows.max()) < 23
    assert not torch.equal(shards[0].rows(0), shards[0].rows(3))  # a new order every epoch
    assert torch.equal(MicroBatches(23, 3, 2, 1, seed=5).rows(4), shards[1].rows(4))  # a pure function of the step
    with pytest.raises(ValueError, match="global batch"):
        MicroBatches(5, 3, 2, 0, seed=0)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one(tokens, tmp_path):
    # Two processes x 2 rows see the rows one process x 4 sees; DDP averages the gradients, so the
    # per-step losses agree to float tolerance.
    base = ["--config", str(REPO / "configs" / "prior_tiny.yaml"), "--token_dataset", str(tokens / "tokens"),
            "--max_steps", "4", "--mixed_precision", "no", "--report_to", "none", "--eval_every", "4",
            "--checkpoint_every", "4", "--gradient_accumulation_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         str(REPO / "scripts" / "train_prior.py"), *base, "--batch_size", "2", "--output_dir", str(tmp_path / "two")],
        check=True, env=env, cwd=REPO,
    )
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_prior.py"), *base, "--batch_size", "4",
         "--output_dir", str(tmp_path / "one")],
        check=True, env=env, cwd=REPO,
    )
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["validation"]["loss"] == pytest.approx(one["validation"]["loss"], rel=1e-4)
