"""DP-SGD on HyMaTE: Opacus's ``make_private`` with our Poisson loader and empty-batch steps.

Three things differ from calling ``PrivacyEngine.make_private`` on a HyMaTE loader directly:

- The loader. Opacus's ``DPDataLoader`` cannot take our dataset (it iterates ``dataset[0]``
  to learn empty shapes, and a stay is not a tuple of tensors) nor make an empty ``Batch``
  (its empty-batch collate knows tensors, lists and dicts only). ``poisson_loader`` does
  the same Poisson sampling (Opacus's ``UniformWithReplacementSampler``) with a collate that
  returns a real empty ``Batch`` (0 stays, L = 1, the dataset's static width).
- Empty batches. ``hymate.train.train_epoch`` answers an empty batch with ``zero_grad()`` then
  ``step()`` and no forward pass; Opacus's optimizer would fail there (no per-sample
  gradients). ``PoissonDPOptimizer`` then gives every parameter an empty (0, ...) per-sample
  gradient, so the step clips nothing, adds the full noise, and the accountant counts it,
  exactly as DP-SGD's analysis assumes. It does so only when the loader has just produced
  an empty batch: a step with no per-sample gradients otherwise (a forgotten ``backward``)
  is still an error.
- Sampling rate and randomness. The accountant is told the plan's sample rate (not
  ``1 / len(loader)``), and the noise and the sampling use a generator seeded from the OS:
  the training loop seeds torch's global generator from values the coordinator knows
  (plan seed, round), and noise the coordinator could regenerate would protect nothing.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from hymate.data.batches import Batch, EncodedStay, StayDataset, collate_stays
from hymate.privacy import grad_samplers

log = logging.getLogger(__name__)

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


@dataclass
class EmptyBatchCounter:
    """Empty batches the loader produced and the optimizer has not yet stepped over."""

    pending: int = 0


class EmptySafeCollate:
    """``collate_stays`` that also turns an empty draw into an empty ``Batch`` of the right width."""

    def __init__(self, n_static: int, counter: EmptyBatchCounter):
        self.n_static = n_static
        self.counter = counter

    def __call__(self, stays: list[EncodedStay]) -> Batch:
        if stays:
            return collate_stays(stays)
        self.counter.pending += 1
        return Batch(
            times=torch.zeros(0, 1),
            variables=torch.zeros(0, 1, dtype=torch.int64),
            values=torch.zeros(0, 1),
            mask=torch.zeros(0, 1, dtype=torch.bool),
            static=torch.zeros(0, self.n_static),
            static_mask=torch.zeros(0, self.n_static, dtype=torch.bool),
            label=torch.zeros(0),
        )


class PoissonDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` that takes a noise-only step for an empty Poisson batch."""

    def __init__(self, *args: Any, empty_batches: EmptyBatchCounter, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.empty_batches = empty_batches

    def pre_step(self, closure=None) -> bool:
        if all(getattr(p, "grad_sample", None) is None for p in self.params):
            if self.empty_batches.pending < 1:
                raise RuntimeError(
                    "DP optimizer step without per-sample gradients: call backward() first "
                    "(only an empty Poisson batch may step without them)"
                )
            self.empty_batches.pending -= 1
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return super().pre_step(closure)


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: nobody outside the process knows its seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def poisson_loader(
    dataset: StayDataset, sample_rate: float, steps: int, generator: torch.Generator, counter: EmptyBatchCounter
) -> DataLoader:
    """``steps`` batches, each stay in each with probability ``sample_rate`` (independently)."""
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=steps
    )
    n_static = len(dataset.table.static_names)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(n_static, counter))


class PrivateTraining(NamedTuple):
    """What ``make_private`` returns; train with ``model``, ``optimizer`` and ``loader`` only.

    ``model`` is Opacus's ``GradSampleModule`` around the original model (which keeps its
    own parameters and state_dict keys: use the original for saving). Call ``close()``
    when done to remove the hooks and grad sinks from the original model.
    """

    model: GradSampleModule
    optimizer: PoissonDPOptimizer
    loader: DataLoader
    engine: PrivacyEngine

    @property
    def steps_taken(self) -> int:
        """DP steps the accountant has composed, including any history it was loaded with."""
        return sum(steps for _, _, steps in self.engine.accountant.history)

    def close(self) -> None:
        self.model._close()
        grad_samplers.detach_grad_sinks(self.model._module)
        for p in self.model._module.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: StayDataset,
    *,
    sample_rate: float,
    steps_per_epoch: int,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    accountant_state: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> PrivateTraining:
    """Wrap ``model``/``optimizer`` for DP-SGD on ``dataset`` with Poisson sampling.

    ``accountant_state`` (an accountant's ``state_dict()``, e.g. the ledger's) is loaded into
    the engine's accountant, so ``engine.accountant`` composes over every earlier round.
    ``generator`` drives sampling and noise (default: seeded from the OS; pass one only in
    tests). ``secure_mode`` is Opacus's (needs torchcsprng).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    ModuleValidator.validate(model, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    if accountant_state is not None:
        engine.accountant.load_state_dict(accountant_state)
    if generator is None and not secure_mode:
        generator = os_seeded_generator()
    sampling = engine.secure_rng if secure_mode else generator

    counter = EmptyBatchCounter()
    loader = poisson_loader(dataset, sample_rate, steps_per_epoch, sampling, counter)
    grad_samplers.attach_grad_sinks(model, loss_reduction="mean")
    with warnings.catch_warnings():  # make_private warns that non-Poisson loaders break DP: ours is Poisson
        warnings.filterwarnings("ignore", message=".*[Pp]oisson.*")
        private_model, dp_optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,  # the loader samples already; make_private would rebuild it
            grad_sample_mode="hooks",
            loss_reduction="mean",
            noise_generator=None if secure_mode else generator,
        )
    private_model.forbid_grad_accumulation()  # as make_private does for its own Poisson loaders
    optimizer = PoissonDPOptimizer(
        dp_optimizer.original_optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=sample_rate * len(dataset),
        loss_reduction="mean",
        generator=dp_optimizer.generator,
        secure_mode=secure_mode,
        empty_batches=counter,
    )
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    log.debug(
        "DP-SGD: noise %.4f, clip %.3g, sample rate %.5f, %d steps/epoch, accountant %s",
        noise_multiplier, max_grad_norm, sample_rate, steps_per_epoch, accountant,
    )  # fmt: skip
    return PrivateTraining(private_model, optimizer, loader, engine)
