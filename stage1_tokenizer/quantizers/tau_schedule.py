"""Temperature schedules for NS-VQ's kernel, as functions of the training step.

NS-VQ (METHOD.md) weighs the pull of a non-selected code by ``softmax_k(-d_ik / tau)``; a large tau reaches
far codes, and as tau -> 0 the method becomes plain vq. The authors decay tau during training: by 0.5 per
epoch in their CelebA-HQ code, and, in their ImageNet configuration, held constant for a warm-up period and
then multiplied by 0.1 per period. Here a schedule is a function of the optimizer step, not of epochs, so
it does not depend on the data set size: set the step knobs to the number of steps per epoch to
reproduce the epoch-wise schedules.

    >>> schedule = build_tau_schedule("step", tau=10.0, warmup_steps=1000, gamma=0.1, step_size=500)
    >>> schedule(0), schedule(1499), schedule(1500)
    (10.0, 10.0, 1.0)
"""

from __future__ import annotations

import math


def _positive(name: str, value: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0 ({hint}), got {value!r}")
    return float(value)


def _count(name: str, value: int, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({hint}), got {value!r}")
    return value


class TauSchedule:
    """Base class: ``schedule(step) -> tau > 0``. Subclasses implement :meth:`value`.

    Args:
        tau: tau_0, the temperature at step 0 (> 0, finite).
    """

    def __init__(self, tau: float):
        self.tau = _positive("tau", tau, "tau_0, the kernel temperature at step 0; the paper starts at 1")

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0 (the optimizer step), got {step!r}")
        return self.value(step)

    def value(self, step: int) -> float:
        raise NotImplementedError


class ConstantTau(TauSchedule):
    """``tau(step) = tau_0``."""

    def value(self, step: int) -> float:
        return self.tau


class ExponentialTau(TauSchedule):
    """``tau(step) = tau_0 * decay_rate ** (step / decay_steps)``, smooth.

    At multiples of ``decay_steps`` it equals the paper's per-epoch ``tau_e = tau_0 r^e`` when
    ``decay_steps`` is the number of steps per epoch (use :class:`StepTau` for the staircase itself).

    Args:
        tau: tau_0.
        decay_rate: factor per ``decay_steps`` steps (> 0); 0.5 in the authors' CelebA-HQ code.
        decay_steps: steps over which tau is multiplied by ``decay_rate`` once (>= 1).
    """

    def __init__(self, tau: float, decay_rate: float = 0.5, decay_steps: int = 1000):
        super().__init__(tau)
        self.decay_rate = _positive("decay_rate", decay_rate, "tau is multiplied by it every decay_steps; 0.5")
        self.decay_steps = _count("decay_steps", decay_steps, 1, "steps per decay, e.g. steps per epoch")

    def value(self, step: int) -> float:
        return self.tau * self.decay_rate ** (step / self.decay_steps)


class StepTau(TauSchedule):
    """Held at ``tau_0`` for ``warmup_steps``, then multiplied by ``gamma`` every ``step_size`` steps:
    ``tau(step) = tau_0 * gamma ** floor(max(step - warmup_steps, 0) / step_size)``.

    With ``warmup_steps=0, gamma=0.5, step_size=<steps per epoch>`` this is the authors' CelebA-HQ schedule;
    with ``tau=10, gamma=0.1`` and a warm-up, their ImageNet one.

    Args:
        tau: tau_0.
        gamma: factor per period (> 0).
        step_size: steps per period (>= 1).
        warmup_steps: steps at ``tau_0`` before the periods start (>= 0); the first period also holds
            ``tau_0``, so the first drop happens at ``warmup_steps + step_size``.
    """

    def __init__(self, tau: float, gamma: float = 0.1, step_size: int = 1000, warmup_steps: int = 0):
        super().__init__(tau)
        self.gamma = _positive("gamma", gamma, "tau is multiplied by it every step_size steps; 0.1")
        self.step_size = _count("step_size", step_size, 1, "steps per period")
        self.warmup_steps = _count("warmup_steps", warmup_steps, 0, "steps at tau_0 before the decay")

    def value(self, step: int) -> float:
        periods = max(step - self.warmup_steps, 0) // self.step_size
        return self.tau * self.gamma**periods


class CosineTau(TauSchedule):
    """Half a cosine from ``tau_0`` at step 0 to ``tau_min`` at ``total_steps``, then ``tau_min``.

    Args:
        tau: tau_0.
        tau_min: final temperature (> 0: tau = 0 would be plain vq and divides by zero in the kernel).
        total_steps: steps of the decay (>= 1).
    """

    def __init__(self, tau: float, tau_min: float = 1e-3, total_steps: int = 100_000):
        super().__init__(tau)
        self.tau_min = _positive("tau_min", tau_min, "the temperature reached at total_steps")
        self.total_steps = _count("total_steps", total_steps, 1, "steps of the cosine decay")

    def value(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.tau_min + (self.tau - self.tau_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


TAU_SCHEDULES: dict[str, type[TauSchedule]] = {
    "constant": ConstantTau,
    "exp": ExponentialTau,
    "step": StepTau,
    "cosine": CosineTau,
}


def build_tau_schedule(name: str, tau: float, **options) -> TauSchedule:
    """Build a schedule by name (one of ``TAU_SCHEDULES``) with tau_0 and the schedule's own knobs.

    Raises:
        ValueError: unknown name, a knob the schedule does not take, or a bad knob value.
    """
    if name not in TAU_SCHEDULES:
        raise ValueError(f"unknown tau_schedule {name!r}; choose one of {sorted(TAU_SCHEDULES)}")
    try:
        return TAU_SCHEDULES[name](tau, **options)
    except TypeError as err:  # a knob of another schedule
        raise ValueError(f"bad option for tau_schedule {name!r}: {err}") from None
