"""Differential privacy for a site's local training (DESIGN.md section 3.2).

One job per module:

- ``grad_samplers``: the per-sample gradients Opacus needs for ``SelectiveSSM`` (read from the
  scan's ``ScanGradSink``, no second scan) and a fast one for depthwise ``Conv1d``.
- ``dp_sgd``: ``make_private``, Opacus's ``PrivacyEngine.make_private`` with a Poisson loader
  for our ``Batch``, noise-only steps for empty Poisson batches, and length-sorted physical
  batches (Poisson batches cannot be bucketed by length).
- ``adaptive_clipping``: quantile-based adaptive clipping (Andrew et al. 2021): the rule, its
  split of the noise between the gradient and the count, and the bound a site keeps between
  rounds (the optimizer is ``dp_sgd.AdaptiveClipDPOptimizer``).
- ``calibration``: ``DPConfig`` and ``plan_round``, the noise that spends the budget evenly
  over the planned rounds.
- ``ledger``: ``PrivacyLedger``, the site's spend composed over every round it ever trained.
- ``training``: ``train_private_round``, refuse / train / record for one round.

Accountant: RDP by default (``accountant="prv"`` is supported and recorded in the ledger).
The ledger is a site's audit record: it is recomputed and checked every time it is opened,
and a hospital must be able to trust and reproduce the number in it years later. RDP's
epsilon is a closed-form upper bound whose composition is plain addition of RDP curves, so
splitting the history into rounds changes nothing (bit-identical here), each evaluation
takes 10-50 ms and next to no memory, and the number does not depend on discretisation settings.
Opacus's PRV accountant is tighter, but only modestly in our regime: at delta = 1e-5 it
allows 4-8 % less noise for the same epsilon (e.g. sigma 1.377 vs 1.460 for epsilon 3,
q = 0.032, 640 steps; epsilon 1-8, q 0.008-0.21, measured here); it pays for that with a
numerical FFT composition whose result depends on its error parameters and domain, about
0.1-0.3 s per evaluation against 10-50 ms, noise calibration in 0.5-8 s against 0.1-2 s,
hundreds of MB of memory in some calibrations, and known memory blow-ups at some settings
(opacus issue #602). A few percent less noise is not worth a budget check that can be
slow, memory-hungry or version-sensitive on a hospital's machine; sites that want the
tighter bound can choose PRV explicitly.

Opacus is imported where DP work starts (noise calibration, the ledger's epsilon, a DP round,
``make_private``), never at import: its package import pulls ``torch.distributed.tensor`` and
``scipy.stats``, about 3 s of CPU, and every site process imports this package (the site's
settings hold a ``DPConfig``), so a site without DP never loads it.
"""

import importlib

from hymate.privacy.adaptive_clipping import AdaptiveClipping, load_clip_bound, save_clip_bound
from hymate.privacy.calibration import (
    ACCOUNTANTS,
    DPConfig,
    RoundPlan,
    calibrate_noise,
    plan_round,
    poisson_schedule,
)
from hymate.privacy.ledger import (
    LedgerError,
    LedgerMismatchError,
    PrivacyLedger,
    Refusal,
    RoundRecord,
    compose_epsilon,
)
from hymate.privacy.training import (
    PrivacyBudgetExhausted,
    PrivateRoundResult,
    check_affordable,
    train_private_round,
)

#: Names of ``dp_sgd``, which imports Opacus (and registers ``grad_samplers`` with it); loaded
#: on first access.
_DP_SGD_NAMES = frozenset({"AdaptiveClipDPOptimizer", "PoissonDPOptimizer", "PrivateTraining", "make_private"})


def __getattr__(name: str):
    if name in _DP_SGD_NAMES:
        return getattr(importlib.import_module("hymate.privacy.dp_sgd"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "AdaptiveClipDPOptimizer",
    "AdaptiveClipping",
    "DPConfig",
    "LedgerError",
    "LedgerMismatchError",
    "PoissonDPOptimizer",
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "PrivateRoundResult",
    "PrivateTraining",
    "Refusal",
    "RoundPlan",
    "RoundRecord",
    "calibrate_noise",
    "check_affordable",
    "compose_epsilon",
    "load_clip_bound",
    "make_private",
    "plan_round",
    "poisson_schedule",
    "save_clip_bound",
    "train_private_round",
]
