"""Crash-safe training checkpoints on top of ``accelerate``'s ``save_state`` / ``load_state``.

A checkpoint is written into a hidden temporary folder and renamed to ``checkpoint-<step>`` only when
complete; a rename within one file system is atomic, so a crash mid-write leaves the previous checkpoint
intact and a half-written folder that is never mistaken for a checkpoint (and is removed on the next
start). Only the last ``keep_last`` checkpoints are kept. Besides what accelerate saves (models,
optimizers, schedulers, the RNG states of every process), a checkpoint holds ``trainer_state.json``
(the step and any plain metadata) and, optionally, ``extra_state.safetensors`` (tensors such as EMA
weights): both written with safe formats, never pickled. Generic: stage two uses it too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
EXTRA_TENSORS_FILE = "extra_state.safetensors"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf: the run stops before the bad update, the last good checkpoint stays."""


class CheckpointManager:
    """Saves, prunes, finds and restores ``checkpoint-<step>`` folders of one run.

    Every process must call :meth:`save`, :meth:`resume` and :meth:`check_finite` (they synchronise).

    Args:
        accelerator: the run's ``Accelerator``, after ``prepare`` (it knows what to save).
        output_dir: folder that holds the ``checkpoint-<step>`` folders.
        keep_last: how many of the newest checkpoints to keep.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, keep_last: int = 3):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # Leftovers of a save that crashed: never complete, never loaded.
            for leftover in self.output_dir.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()

    # -- finding -----------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = []
        for path in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            match = _CHECKPOINT_NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, Tensor] | None = None, metadata: dict | None = None) -> Path:
        """Write ``checkpoint-<step>`` atomically, then delete all but the newest ``keep_last``.

        Args:
            step: the number of optimizer updates done.
            tensors: extra tensors to restore later (EMA weights, counters), saved as safetensors.
            metadata: extra JSON-serialisable values, stored in ``trainer_state.json``.

        Returns:
            The checkpoint folder.
        """
        accelerator = self.accelerator
        temp = self.output_dir / f"{TEMP_PREFIX}{step}"
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if tensors:
                save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                          str(temp / EXTRA_TENSORS_FILE))
            # Written last: a folder without it is incomplete (checkpoints() ignores it).
            state = {"step": int(step), "num_processes": accelerator.num_processes, "metadata": metadata or {}}
            (temp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
                shutil.rmtree(final)
            temp.rename(final)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    # -- restoring ---------------------------------------------------------------------------------
    def resolve(self, spec: str | Path | None) -> Path | None:
        """The checkpoint folder that ``spec`` names: None -> None, "latest" -> the newest (None when
        there is none yet, so that a first run and its restarts share one command), else a path."""
        if spec is None:
            return None
        if str(spec) == "latest":
            return self.latest()
        path = Path(spec)
        if not (path / STATE_FILE).is_file():
            raise ValueError(
                f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-<step> "
                f"folder or 'latest' (checkpoints of this run: {[p.name for p in self.checkpoints()]})"
            )
        return path

    def resume(self, spec: str | Path | None) -> int:
        """Restore models, optimizers, schedulers and every process's RNG states from a checkpoint.

        Args:
            spec: None (start fresh), "latest", or a checkpoint folder.

        Returns:
            The restored step (0 when nothing was restored).
        """
        path = self.resolve(spec)
        if path is None:
            return 0
        state = self.read_state(path)
        if state["num_processes"] != self.accelerator.num_processes:
            warnings.warn(
                f"{path} was written by {state['num_processes']} processes and is resumed by "
                f"{self.accelerator.num_processes}: training continues, but data order and random streams differ "
                "from an uninterrupted run", stacklevel=2,
            )
        self.accelerator.load_state(str(path))
        return int(state["step"])

    @staticmethod
    def read_state(path: str | Path) -> dict:
        """``trainer_state.json`` of a checkpoint: ``{"step", "num_processes", "metadata"}``."""
        return json.loads((Path(path) / STATE_FILE).read_text())

    @staticmethod
    def read_tensors(path: str | Path) -> dict[str, Tensor]:
        """The extra tensors saved with a checkpoint (empty when none were)."""
        file = Path(path) / EXTRA_TENSORS_FILE
        return load_file(str(file)) if file.is_file() else {}

    # -- the NaN guard -----------------------------------------------------------------------------
    def check_finite(self, losses: dict[str, Tensor | float], step: int) -> None:
        """Stop the run if any loss on any process is NaN or inf.

        Call it before the optimizer step: the bad update is never applied and never saved, so the newest
        checkpoint is the last good state. Every process raises together (the check is all-reduced), so
        none is left waiting in a collective.

        Raises:
            NonFiniteLossError: naming the step, the non-finite losses and the checkpoint to resume from.
        """
        bad = {name: float(value) for name, value in losses.items() if not math.isfinite(float(value))}
        flag = torch.tensor([float(bool(bad))], device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() == 0:
            return
        latest = self.latest()
        where = (
            f"the last good checkpoint is {latest} (resume with --resume_from_checkpoint latest, "
            "after lowering the learning rate or enabling gradient clipping)"
            if latest is not None
            else "no checkpoint was written before it"
        )
        detail = ", ".join(f"{name}={value}" for name, value in bad.items()) or "on another process"
        raise NonFiniteLossError(f"non-finite loss at step {step}: {detail}; the run stopped; {where}")
