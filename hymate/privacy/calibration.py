"""A site's DP settings and the noise that spends its budget evenly over the planned rounds.

The noise multiplier is fixed up front: for the planned number of rounds x local epochs x
Poisson steps per epoch, the smallest noise (to a bisection tolerance) whose composed epsilon
stays at or below the target (Opacus's ``get_noise_multiplier``). Every round then costs the
same, and the last planned round lands just under the target. The plan is a pure function
of (config, training-set size, batch size, local epochs), so every round of a federation
derives the same noise without storing it; the ledger, not the plan, decides whether a
round is still affordable (a site with spend from an earlier federation will be refused
before its last planned rounds, with the reason).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

#: Opacus's accountants a site may choose (see ``hymate.privacy`` for why RDP is the default).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


@dataclass(frozen=True)
class DPConfig:
    """A site's privacy budget and how it is spent; set by the site, never by the coordinator.

    ``target_epsilon``/``delta``: the (epsilon, delta) the site allows over its whole life.
    ``max_grad_norm``: per-sample clipping bound C (noise std is ``noise_multiplier * C``).
    ``accountant``: "rdp" (default) or "prv", see ``hymate.privacy``.
    ``planned_rounds``: rounds the noise is calibrated for.
    ``clip_quantile``: adapt the clipping bound (starting from ``max_grad_norm``) so that this
    share of per-sample gradients stays unclipped (``hymate.privacy.adaptive_clipping``); None
    clips at ``max_grad_norm`` throughout. ``clip_learning_rate``: how fast the bound moves.
    """

    target_epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    planned_rounds: int = 1
    clip_quantile: float | None = None
    clip_learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a positive number, got {self.target_epsilon}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.planned_rounds < 1:
            raise ValueError(f"planned_rounds must be at least 1, got {self.planned_rounds}")
        if self.clip_quantile is not None and not 0 < self.clip_quantile < 1:
            raise ValueError(f"clip_quantile must be in (0, 1), got {self.clip_quantile}")
        if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
            raise ValueError(f"clip_learning_rate must be a finite number > 0, got {self.clip_learning_rate}")


@dataclass(frozen=True)
class RoundPlan:
    """One round of DP-SGD at a site: ``local_epochs`` x ``steps_per_epoch`` Poisson steps."""

    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    local_epochs: int
    n_train: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.local_epochs

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_train


def poisson_schedule(n_train: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch): q = batch_size / n_train (at most 1), ceil(1 / q) steps.

    The steps come from integers (ceil(n / b)), so no float rounding changes their count.
    """
    if n_train < 1:
        raise ValueError(f"a site needs at least one training stay for DP-SGD, got {n_train}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_size >= n_train:
        return 1.0, 1
    return batch_size / n_train, -(-n_train // batch_size)


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier whose epsilon after ``steps`` steps is at most ``target_epsilon``.

    Within ``min(0.01, 0.002 * target)`` below the target (bisection); cached per argument set.
    Raises ValueError when no noise below Opacus's MAX_SIGMA reaches the target.
    """
    from opacus.accountants.utils import get_noise_multiplier  # loaded on first use: see hymate.privacy

    tolerance = min(0.01, 0.002 * target_epsilon)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        except ValueError as e:
            raise ValueError(
                f"no noise multiplier reaches epsilon {target_epsilon:g} (delta {delta:g}) over {steps} steps at "
                f"sample rate {sample_rate:.4g} ({e}); raise the target or plan fewer rounds, epochs or a smaller batch"
            ) from e
    return float(sigma)


def plan_round(config: DPConfig, n_train: int, batch_size: int, local_epochs: int) -> RoundPlan:
    """The per-round plan that spends ``config.target_epsilon`` evenly over the planned rounds."""
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be at least 1, got {local_epochs}")
    sample_rate, steps_per_epoch = poisson_schedule(n_train, batch_size)
    total_steps = config.planned_rounds * local_epochs * steps_per_epoch
    sigma = calibrate_noise(config.target_epsilon, config.delta, sample_rate, total_steps, config.accountant)
    return RoundPlan(sigma, sample_rate, steps_per_epoch, local_epochs, n_train)
