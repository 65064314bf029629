"""One site's DP round: check the budget, train with DP-SGD, then (only then) record the spend.

The order is the point. The cost of the round is known before it starts (the plan fixes
noise, sample rate and steps), so a round that would exceed the budget is refused without
touching the data. The spend is recorded after training succeeded: a round that fails
releases nothing, so it spends nothing; a round that succeeded is in the ledger before its
weights can leave the function.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hymate.data.batches import StayDataset
from hymate.privacy.adaptive_clipping import AdaptiveClipping
from hymate.privacy.calibration import DPConfig, RoundPlan
from hymate.privacy.ledger import PrivacyLedger, append_steps
from hymate.train import ProximalTerm, train_epoch

log = logging.getLogger(__name__)


class PrivacyBudgetExhausted(RuntimeError):
    """A site refused a round because it would take its privacy spend past its target."""

    def __init__(self, reason: str, epsilon_spent: float, target_epsilon: float, epsilon_if_trained: float):
        super().__init__(reason)
        self.reason = reason
        self.epsilon_spent = epsilon_spent
        self.target_epsilon = target_epsilon
        self.epsilon_if_trained = epsilon_if_trained


@dataclass(frozen=True)
class PrivateRoundResult:
    """What a DP round did: its losses and the site's privacy spend after it."""

    epoch_losses: tuple[float, ...]
    epsilon_spent: float  # over every round this site ever trained
    epsilon_round: float  # what this round added
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds_trained: int
    clip_bound: float  # the per-sample clipping bound at the end of the round (the next round's start)

    @property
    def train_loss(self) -> float:
        return float(np.mean(self.epoch_losses))

    def metrics(self) -> dict[str, float]:
        """Aggregate privacy facts a site may report (no data about any patient)."""
        return {
            "dp-epsilon": self.epsilon_spent,
            "dp-epsilon-round": self.epsilon_round,
            "dp-target-epsilon": self.target_epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": float(self.steps),
            "dp-clip-bound": self.clip_bound,
        }


def check_affordable(ledger: PrivacyLedger, plan: RoundPlan, label: str = "") -> float:
    """Epsilon after the planned round; logs a refusal and raises if it exceeds the target."""
    cost = ledger.cost_if(plan.noise_multiplier, plan.sample_rate, plan.steps)
    if cost <= ledger.target_epsilon:
        return cost
    reason = (
        f"refusing to train: this round would bring the privacy spend to epsilon {cost:.4f}, over the target "
        f"{ledger.target_epsilon:g} (delta {ledger.delta:g}); spent so far {ledger.epsilon_spent:.4f} over "
        f"{ledger.rounds_trained} round(s), this round alone would add {cost - ledger.epsilon_spent:.4f} "
        f"(noise {plan.noise_multiplier:.4f}, sample rate {plan.sample_rate:.4g}, {plan.steps} steps)"
    )
    ledger.record_refusal(reason, plan.noise_multiplier, plan.sample_rate, plan.steps, cost, label)
    log.warning("%s", reason)
    raise PrivacyBudgetExhausted(reason, ledger.epsilon_spent, ledger.target_epsilon, cost)


def train_private_round(
    model: nn.Module,
    dataset: StayDataset,
    optimizer: torch.optim.Optimizer,
    plan: RoundPlan,
    config: DPConfig,
    ledger: PrivacyLedger,
    *,
    device: torch.device,
    pos_weight: float,
    proximal: ProximalTerm | None = None,
    label: str = "",
    generator: torch.Generator | None = None,
    clip_bound: float | None = None,
) -> PrivateRoundResult:
    """``plan.local_epochs`` epochs of DP-SGD on ``dataset``, within the ledger's budget.

    ``model`` (already on ``device``) is trained in place and comes back without Opacus's
    hooks; ``optimizer`` is a plain optimizer over its parameters (e.g. ``make_optimizer``).
    Raises ``PrivacyBudgetExhausted`` (and logs the refusal in the ledger) before touching
    the data if the round would exceed the target. ``proximal`` (FedProx) is applied to the
    noised gradient, not through the loss. ``label`` names the round in the ledger. If
    training raises, nothing is recorded: the partly trained model must then not be released.
    ``clip_bound``: where adaptive clipping (``config.clip_quantile``) starts, e.g. the bound the
    site's last round ended with (default ``config.max_grad_norm``); the result's ``clip_bound``
    is where it ended.
    """
    budget = (config.target_epsilon, config.delta, config.accountant)
    if (ledger.target_epsilon, ledger.delta, ledger.accountant) != budget:
        raise ValueError(f"the ledger at {ledger.path} holds another budget than the DPConfig: {config}")
    if len(dataset) != plan.n_train:
        raise ValueError(f"the plan was made for {plan.n_train} training stays, the dataset has {len(dataset)}")
    spent_before = ledger.epsilon_spent
    check_affordable(ledger, plan, label)

    clipping = None
    if config.clip_quantile is not None:
        clipping = AdaptiveClipping.for_step(
            config.clip_quantile, config.clip_learning_rate, plan.expected_batch_size, plan.noise_multiplier
        )
    from hymate.privacy.dp_sgd import make_private  # imports Opacus: loaded on first use, see hymate.privacy

    dp = make_private(
        model,
        optimizer,
        dataset,
        sample_rate=plan.sample_rate,
        steps_per_epoch=plan.steps_per_epoch,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm if clip_bound is None else clip_bound,
        accountant=config.accountant,
        accountant_state=ledger.accountant_state(),
        generator=generator,
        public_gradient=_proximal_gradient(model, proximal),
        clipping=clipping,
    )
    try:
        with warnings.catch_warnings():
            # torch warns when a hooked layer's inputs need no gradient (the embeddings): expected here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses = tuple(
                train_epoch(dp.model, dp.loader, dp.optimizer, device, pos_weight, max_grad_norm=None)
                for _ in range(plan.local_epochs)
            )
    finally:
        dp.close()

    expected = append_steps(ledger.history, plan.noise_multiplier, plan.sample_rate, plan.steps)
    counted = [tuple(e) for e in dp.engine.accountant.history]
    steps = plan.steps
    if counted != expected:  # cannot happen with train_epoch; never under-report if it does
        steps = max(plan.steps, dp.steps_taken - sum(s for _, _, s in ledger.history))
        ledger.record(plan.noise_multiplier, plan.sample_rate, steps, label)
        raise RuntimeError(f"the accountant counted {counted}, the plan expected {expected}; recorded {steps} steps")
    spent = ledger.record(plan.noise_multiplier, plan.sample_rate, steps, label)
    if not all(np.isfinite(losses)):
        log.warning("DP round %s: non-finite training loss %s", label, losses)
    return PrivateRoundResult(
        epoch_losses=losses,
        epsilon_spent=spent,
        epsilon_round=spent - spent_before,
        target_epsilon=ledger.target_epsilon,
        delta=ledger.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        rounds_trained=ledger.rounds_trained,
        clip_bound=float(dp.optimizer.max_grad_norm),
    )


def _proximal_gradient(model: nn.Module, proximal: ProximalTerm | None):
    """FedProx's gradient ``mu * (w - w_global)`` per parameter, or None without FedProx."""
    if proximal is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = {id(p): a for p, a in zip(params, proximal.anchor, strict=True)}

    def gradient(p: nn.Parameter) -> torch.Tensor | None:
        anchor = anchors.get(id(p))
        return None if anchor is None else proximal.mu * (p.detach() - anchor)

    return gradient
