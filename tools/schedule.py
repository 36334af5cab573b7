"""The training schedule that ``tools/train_builtin.py`` and ``tools/train_draft.py`` share: the learning rate
(linear warm-up, then cosine decay to 10%), when to evaluate and when to stop (no held-out improvement for
``--patience`` steps, all steps done, or ``--time-limit``), and ``--budget``, which fixes the step count from the
speed measured between step 10 and step ``probe``.

Not responsible for: the model, the loss, what an evaluation measures or which state is best (each trainer's own).

Invariants: ``probe`` falls in warm-up, where the learning rate does not depend on the step count, so a run whose
step count ``--budget`` fixed is the same as one started with that ``--steps`` (the log line says which); the speed
leaves out the seconds spent evaluating (``evaluated``) and adds their average share back per step; no step count
is fixed unless ``probe`` > 10 (the speed is measured from step 10).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

BUDGET_PROBE = 40  # with --budget, the step at which the step count is fixed from the measured speed


class Schedule:
    """One training run's schedule. ``total_steps`` starts at ``steps`` and may be lowered once by ``--budget``
    (``before_update`` at ``probe``, never below ``min_steps``); ``t_train`` is when training started and
    ``t_eval`` the seconds spent evaluating since (``evaluated``)."""

    def __init__(self, lr: float, warmup: int, steps: int, probe: int, min_steps: int, budget: float | None,
                 time_limit: float, patience: int, eval_every: int, log: Callable[[str], None]) -> None:
        self.lr, self.warmup, self.max_steps, self.total_steps = lr, warmup, steps, steps
        self.probe, self.min_steps, self.budget, self.time_limit = probe, min_steps, budget, time_limit
        self.patience, self.eval_every, self.log = patience, eval_every, log
        self.t_train = time.time()
        self.t_eval = 0.0  # seconds spent evaluating, left out of the speed measurement
        self.evaluations = 0
        self._t_rate = self._e_rate = 0.0  # at step 10: the clock and t_eval

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% at ``total_steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def evaluates(self, step: int) -> bool:
        """Whether the held-out figure is measured before update ``step`` (and after the last one)."""
        return step % self.eval_every == 0 or step == self.total_steps

    def evaluated(self, started: float) -> None:
        """An evaluation that began at ``started`` (``time.time()``) has ended."""
        self.t_eval += time.time() - started
        self.evaluations += 1

    def stop(self, step: int, best_step: int, evaluated: bool) -> str:
        """Why training stops before update ``step``, or "" to go on; the patience rule is applied only on a step
        that ``evaluated``."""
        if evaluated and step - best_step >= self.patience:
            return f"no held-out improvement for {self.patience} steps"
        if step >= self.total_steps:
            return "all steps done"
        if time.time() - self.t_train > self.time_limit:
            return f"time limit {self.time_limit}s"
        return ""

    def before_update(self, step: int, sync: Callable[[], None] | None) -> None:
        """Times steps 10 to ``probe`` (``sync``: waits for the device's queued work, so that its work is timed,
        not the launches) and, with a budget, fixes ``total_steps`` at ``probe``."""
        if step in (10, self.probe) and sync is not None:
            sync()
        if step == 10:
            self._t_rate, self._e_rate = time.time(), self.t_eval
        if step == self.probe and self.budget and self.probe > 10:
            per_step = (time.time() - self._t_rate - (self.t_eval - self._e_rate)) / (self.probe - 10)
            per_step += (self.t_eval / max(1, self.evaluations)) / self.eval_every
            fit = self.probe + int((self.budget - (time.time() - self.t_train)) / per_step)
            self.total_steps = max(self.min_steps, min(self.max_steps, fit))
            self.log(f"{1 / per_step:.1f} steps/s with evaluations: training for {self.total_steps} steps "
                     f"(replay with --steps {self.total_steps})")
