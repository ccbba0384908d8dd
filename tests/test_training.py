"""Stage-one training infrastructure: configs, checkpoints, the NaN guard, exact resume, two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.checkpoints import CheckpointManager, NonFiniteLossError
from stage1_tokenizer.config import TokenizerTrainingConfig, load_config, save_config
from stage1_tokenizer.losses import VQGANLoss
from stage1_tokenizer.training import build_lr_scheduler, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets"))


def tiny_config(output_dir: Path, cache_dir: str, **overrides) -> TokenizerTrainingConfig:
    """32 px synthetic faces, 18 training images (4 batches of 4), f = 4, K = 16, D = 8."""
    values = dict(
        quantizer="vq", codebook_size=16, latent_channels=8, block_out_channels=[16, 16, 16], norm_num_groups=8,
        image_size=32, num_images=24, cache_dir=cache_dir, batch_size=4, max_steps=4, learning_rate=2e-3,
        output_dir=str(output_dir), checkpoint_every=100, log_every=1, image_every=100, num_grid_images=0,
        report_to="none",
    )
    values.update(overrides)
    return TokenizerTrainingConfig(**values)


# -- config --------------------------------------------------------------------------------------------
def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("quantizer: transvq\nlearning_rate: 5e-4\nblock_out_channels: [32, 64]\nimage_size: 32\n"
                    "quantizer_options: {width: 64}\n")
    cfg = load_config(TokenizerTrainingConfig, [
        "--config", str(path), "--max_steps", "7", "--quantizer_options", "{width: 32, beta: 0.5}",
        "--use_ema", "--block_out_channels", "32", "32", "64",
    ])
    assert cfg.quantizer == "transvq"  # from the file
    assert cfg.learning_rate == 5e-4 and isinstance(cfg.learning_rate, float)  # YAML's "5e-4" is a string
    assert cfg.max_steps == 7 and cfg.use_ema is True  # from the command line
    assert cfg.quantizer_options == {"width": 32, "beta": 0.5}
    assert cfg.block_out_channels == [32, 32, 64]
    assert cfg.batch_size == TokenizerTrainingConfig().batch_size  # the default
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(TokenizerTrainingConfig, ["--config", str(tmp_path / "saved.yaml")]) == cfg


def test_unknown_keys_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quantizer: vq\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(TokenizerTrainingConfig, ["--config", str(path)])
    with pytest.raises(ValueError, match="the command line: 'max_stepz'"):
        load_config(TokenizerTrainingConfig, ["--max_stepz", "3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(TokenizerTrainingConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        TokenizerTrainingConfig(image_size=30)
    with pytest.raises(ValueError, match="quantizer="):
        TokenizerTrainingConfig(quantizer="kmeans")
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        TokenizerTrainingConfig(batch_size=0)


@pytest.mark.parametrize("name", ["tokenizer_tiny", "tokenizer_paper_celebahq64", "tokenizer_vqgan64"])
def test_shipped_configs_parse(name):
    cfg = load_config(TokenizerTrainingConfig, ["--config", str(REPO / "configs" / f"{name}.yaml")])
    tokenizer = VQTokenizer(**cfg.tokenizer_kwargs())
    assert tokenizer.grid_size(cfg.image_size)[0] >= 8
    if name == "tokenizer_paper_celebahq64":
        assert (tokenizer.downsampling_factor, cfg.latent_channels, cfg.codebook_size, cfg.image_size) == (4, 64, 1024, 64)
        assert (cfg.pixel_loss, cfg.perceptual_weight, cfg.gan_weight) == ("mse", 0.0, 0.0)
        assert (cfg.learning_rate, cfg.batch_size, cfg.max_grad_norm, cfg.lr_schedule) == (5e-4, 16, 1.0, "exponential")


def test_lr_schedules():
    def multipliers(**overrides):
        cfg = TokenizerTrainingConfig(learning_rate=1.0, max_steps=10, **overrides)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_lr_scheduler(optimizer, cfg, steps_per_epoch=4, total_steps=10)
        values = []
        for _ in range(10):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert multipliers(lr_schedule="constant", lr_warmup_steps=2) == pytest.approx([0, 0.5] + [1.0] * 8)
    cosine = multipliers(lr_schedule="cosine", lr_warmup_steps=0)
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.05
    exponential = multipliers(lr_schedule="exponential", lr_decay_rate=0.5)  # halves every epoch of 4 steps
    assert exponential[4] == pytest.approx(0.5) and exponential[8] == pytest.approx(0.25)


# -- checkpoints -----------------------------------------------------------------------------------------
def tiny_accelerator_run():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_keep_last_and_latest(tmp_path):
    accelerator, model, _ = tiny_accelerator_run()
    manager = CheckpointManager(accelerator, tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3, 10):
        manager.save(step, metadata={"note": step})
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-3", "checkpoint-10"]  # numeric order
    assert manager.latest() == tmp_path / "checkpoint-10"
    assert CheckpointManager.read_state(manager.latest())["metadata"] == {"note": 10}


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator, model, _ = tiny_accelerator_run()
    manager = CheckpointManager(accelerator, tmp_path, keep_last=3)
    manager.save(5, tensors={"counts": torch.arange(4)})
    saved_weight = model.weight.detach().clone()

    def crash(output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        manager.save(6)
    assert (tmp_path / ".tmp-checkpoint-6").is_dir()  # the half-written folder ...
    assert manager.latest() == tmp_path / "checkpoint-5"  # ... is never taken for a checkpoint
    monkeypatch.undo()

    restarted = CheckpointManager(accelerator, tmp_path, keep_last=3)
    assert not (tmp_path / ".tmp-checkpoint-6").exists()  # cleaned on the next start
    assert restarted.resume("latest") == 5
    torch.testing.assert_close(model.weight, saved_weight, rtol=0, atol=0)
    assert torch.equal(restarted.read_tensors(restarted.latest())["counts"], torch.arange(4))


def test_resume_specs(tmp_path):
    accelerator, model, _ = tiny_accelerator_run()
    manager = CheckpointManager(accelerator, tmp_path / "ckpt")
    assert manager.resume(None) == 0
    assert manager.resume("latest") == 0  # nothing yet: a first run and its restarts share one command
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resume(tmp_path / "nowhere")
    saved = manager.save(3)
    assert manager.resume(str(saved)) == 3


def test_check_finite(tmp_path):
    accelerator, _, _ = tiny_accelerator_run()
    manager = CheckpointManager(accelerator, tmp_path)
    manager.check_finite({"pixel": torch.tensor(0.5), "quantizer": 0.1}, step=1)
    manager.save(2)
    with pytest.raises(NonFiniteLossError, match=r"step 3: quantizer=nan.*checkpoint-2"):
        manager.check_finite({"pixel": torch.tensor(0.5), "quantizer": torch.tensor(float("nan"))}, step=3)
    with pytest.raises(NonFiniteLossError, match="pixel=inf"):
        manager.check_finite({"pixel": float("inf")}, step=4)


# -- the training loop -------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands for the process being killed."""


def test_resume_is_exact(tmp_path, data_cache, monkeypatch):
    """6 steps in one go == the same run killed after its step-3 checkpoint and resumed: the same logged
    numbers at steps 4-6 and the same final weights, bit for bit.

    Hard on purpose: random flips, gradient accumulation (2 micro-batches; the resume point lies
    mid-epoch), a PatchGAN switched on at step 2 (a second optimizer and scheduler), cosine LR with
    warm-up, EMA weights (what is saved at the end) and per-epoch usage counts.
    """
    options = dict(
        max_steps=6, gradient_accumulation_steps=2, random_flip=True, gan_weight=0.5, disc_start_step=2,
        disc_channels=8, disc_layers=2, lr_schedule="cosine", lr_warmup_steps=2, use_ema=True, ema_decay=0.9,
        checkpoint_every=3,
    )
    straight = train_tokenizer(tiny_config(tmp_path / "straight", data_cache, **options))

    save = CheckpointManager.save

    def save_then_die(self, step, **kwargs):
        path = save(self, step, **kwargs)
        if step == 3:
            raise Killed
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(Killed):
        train_tokenizer(tiny_config(tmp_path / "resumed", data_cache, **options))
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = train_tokenizer(tiny_config(tmp_path / "resumed", data_cache, resume_from_checkpoint="latest", **options))

    assert resumed["start_step"] == 3 and resumed["steps"] == 6
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6]
    assert "loss/gan_discriminator" in resumed["history"][-1]
    assert straight["history"][3:] == resumed["history"]  # exact, every logged number
    assert straight["usage"] == resumed["usage"]
    weights = [load_file(str(tmp_path / run / "tokenizer" / "diffusion_pytorch_model.safetensors"))
               for run in ("straight", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_cache, monkeypatch):
    original = VQGANLoss.generator_loss
    calls = []

    def poisoned(self, *args, **kwargs):
        total, logs = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 5:  # step 5 onwards
            total = total * float("nan")
            logs["total"] = total.detach()
        return total, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", poisoned)
    cfg = tiny_config(tmp_path / "run", data_cache, max_steps=8, checkpoint_every=2, keep_last=5)
    with pytest.raises(NonFiniteLossError, match=r"step 5: total=nan.*checkpoint-4"):
        train_tokenizer(cfg)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert CheckpointManager.read_state(tmp_path / "run" / "checkpoints" / "checkpoint-4")["step"] == 4
    assert not (tmp_path / "run" / "tokenizer").exists()

    monkeypatch.undo()  # the cause fixed, the run resumes from the last good checkpoint
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    result = train_tokenizer(tiny_config(tmp_path / "run", data_cache, max_steps=6, checkpoint_every=2,
                                         resume_from_checkpoint="latest"))
    assert result["start_step"] == 4 and result["steps"] == 6


def test_outputs_tensorboard_samples_and_inference_export(tmp_path, data_cache):
    """A bf16-autocast TransVQ run: TensorBoard events, a sample grid, the config, the trained tokenizer and
    its plain-table export (same tokens)."""
    cfg = tiny_config(tmp_path / "run", data_cache, quantizer="transvq", quantizer_options={"width": 16},
                      max_steps=2, image_every=2, num_grid_images=3, report_to="tensorboard",
                      mixed_precision="bf16")
    result = train_tokenizer(cfg)
    run = tmp_path / "run"
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert (run / "samples" / "step-0000002.png").is_file()
    assert json.loads((run / "train_result.json").read_text())["steps"] == 2
    assert load_config(TokenizerTrainingConfig, ["--config", str(run / "config.yaml")]) == cfg
    trained = VQTokenizer.from_pretrained(result["tokenizer_dir"]).eval()
    exported = VQTokenizer.from_pretrained(result["inference_dir"]).eval()
    assert (trained.config.quantizer, exported.config.quantizer) == ("transvq", "vq")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(trained.encode(images), exported.encode(images))
    assert "vector-quantization" in (run / "tokenizer-inference" / "README.md").read_text()
    record = result["history"][-1]
    assert {"loss/total", "loss/pixel", "loss/quantizer", "usage/utilisation", "usage/dead_codes", "lr"} <= set(record)
    assert result["usage"]["total_hits"] == 2 * 4 * 8 * 8  # steps x batch x 8 x 8 tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 28-44 s measured on the shared 2-core machine: two launches of torch + diffusers
def test_two_processes_merge_codebook_usage(tmp_path, data_cache):
    """``--multi_gpu --num_processes 2`` really starts two gloo processes on a CPU-only machine (DESIGN.md);
    codebook usage is summed over both. 42 training images: 5 batches of 4 per process, so 3 steps stay
    inside the first epoch (usage counts are per epoch)."""
    output_dir = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO / "scripts" / "train_tokenizer.py"),
        "--quantizer", "vq", "--codebook_size", "16", "--latent_channels", "8", "--block_out_channels", "16", "16", "16",
        "--norm_num_groups", "8", "--image_size", "32", "--num_images", "56", "--cache_dir", data_cache,
        "--batch_size", "4", "--max_steps", "3", "--checkpoint_every", "2", "--log_every", "1",
        "--num_grid_images", "0", "--report_to", "none", "--output_dir", str(output_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((output_dir / "train_result.json").read_text())
    assert result["num_processes"] == 2
    tokens = 3 * 4 * 8 * 8  # steps x per-process batch x 8 x 8 tokens
    assert result["tokens_per_process"] == tokens
    assert result["usage"]["total_hits"] == 2 * tokens  # merged over both ranks
    assert CheckpointManager.read_state(output_dir / "checkpoints" / "checkpoint-2")["num_processes"] == 2
    assert (output_dir / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()
