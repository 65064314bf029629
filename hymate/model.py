"""HyMaTE: a hybrid Mamba + Transformer network for irregular, multivariate EHR.

Read top to bottom, this file is the architecture (DESIGN.md section 3):

1. ``TripletEmbedding``: every event (time, variable, value) becomes
   ``CVE(time) + CVE(value) + Embedding(variable)``; padding is zeroed explicitly.
2. ``MambaBlock`` x N: ``x + Mamba(LayerNorm(x))`` then ``x + FFN(LayerNorm(x))`` over the
   time-sorted events. The selective scan is causal and padding sits after the last real
   event, so padding never reaches a real position.
3. ``AttentionBlock`` x M: padding-masked multi-head self-attention (pre-norm).
4. ``AttentionPooling``: ``softmax(u^T tanh(W x))`` over real events to one vector.
5. ``StaticEncoder``: static features with missingness indicators to a vector; with
   ``summary_branch``, ``StaySummaries`` (each variable's first/last/min/max/mean z-scored
   value and log count in the stay) go in next to them.
6. A linear head on both vectors gives one logit (in-hospital death, sepsis, ...).

Steps 1 and 5 read each value as ``value_transform`` says: its z-score, or asinh of it.

Every parameter lives in an ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` or
``nn.Conv1d``, except ``A_log``/``D`` in ``SelectiveSSM``: Opacus computes per-sample
gradients for the former, and ``hymate.privacy`` registers a sampler for the latter. The
attention is built from ``nn.Linear`` projections around ``scaled_dot_product_attention``
(PyTorch's fused CPU kernel, which ``nn.MultiheadAttention`` with attention dropout misses),
so it is both fast and Opacus-compatible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hymate.data.batches import Batch
from hymate.data.stays import StayTable
from hymate.settings_fields import setting
from hymate.ssm import ScanGradSink, causal_conv1d, selective_scan

# How the classification head starts. "zero" makes every first prediction the same, so the first
# gradient steps, not the draw, decide how each feature counts. A random head is already a
# ranking (AUROC 0.36-0.63 over 30 draws on PhysioNet 2012 with a pre-trained encoder), and the
# few dozen noisy DP-SGD steps a small site can afford do not undo it.
HEAD_INITS: tuple[str, ...] = ("random", "zero")

# What the model reads of each z-scored value. "asinh" squashes the tails (asinh(8) = 2.8): the
# normaliser clips z-scores at +-8, but skewed labs (urine, enzymes, lactate) and unit errors
# (a pH of 735) still put a few values far from the ordinary ones, which then dominate the
# first linear layers and the summaries. A fixed function of the z-score, so it needs no
# statistic beyond the (federated) normaliser's; on PhysioNet 2012 the summary path alone went
# from AUROC 0.852 to 0.860 with it (lineage, six seeds), as much as a log of the skewed labs.
VALUE_TRANSFORMS: tuple[str, ...] = ("z", "asinh")


@dataclass(frozen=True)
class HyMaTEConfig:
    """Shape and regularisation of a HyMaTE model; the data fixes the first two fields."""

    n_variables: int
    n_static: int
    d_model: int = 64
    n_mamba_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    n_attention_layers: int = 1
    n_heads: int = 4
    dropout: float = 0.2
    time_scale_hours: float = 24.0
    scan_backend: str = "auto"
    summary_branch: bool = False
    head_init: str = "random"
    value_transform: str = "z"

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"unknown head_init {self.head_init!r}; valid: {', '.join(HEAD_INITS)}")
        if self.value_transform not in VALUE_TRANSFORMS:
            raise ValueError(f"unknown value_transform {self.value_transform!r}; valid: {', '.join(VALUE_TRANSFORMS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_variables < 1:
            raise ValueError("n_variables must be at least 1")


@dataclass(frozen=True)
class ModelOptions:
    """The HyMaTE knobs a user sets; the data supplies the vocabulary sizes."""

    d_model: int = setting(64, help="width of the model")
    n_mamba_layers: int = setting(2, key="mamba-layers")
    d_state: int = setting(16, help="state size of each selective SSM")
    n_attention_layers: int = setting(1, key="attention-layers")
    n_heads: int = setting(4, key="heads", help="attention heads")
    dropout: float = setting(0.2)
    scan_backend: str = setting("auto", choices=("auto", "cpu", "torch", "cuda"), help="selective-scan kernel")
    summary_branch: bool = setting(
        False, help="feed each stay's per-variable first/last/min/max/mean/log-count next to the static features"
    )
    head_init: str = setting(
        "random",
        choices=HEAD_INITS,
        help="the classification head's starting weights (also over an --init-from checkpoint's): random, or zero "
        "so that training alone sets the sign of each feature (for DP-SGD's few noisy steps)",
    )
    value_transform: str = setting(
        "z",
        choices=VALUE_TRANSFORMS,
        help="what the model reads of each value: its clipped z-score, or asinh of it (squashes skewed labs' tails)",
    )

    def for_table(self, table: StayTable) -> HyMaTEConfig:
        return self.for_schema(len(table.variables), len(table.static_names))

    def for_schema(self, n_variables: int, n_static: int) -> HyMaTEConfig:
        return HyMaTEConfig(
            n_variables=n_variables,
            n_static=n_static,
            d_model=self.d_model,
            n_mamba_layers=self.n_mamba_layers,
            d_state=self.d_state,
            n_attention_layers=self.n_attention_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            scan_backend=self.scan_backend,
            summary_branch=self.summary_branch,
            head_init=self.head_init,
            value_transform=self.value_transform,
        )


# What fine-tuning may keep fixed (``TrainConfig.freeze``): the triplet embedding alone, or the
# whole sequence encoder (embedding, Mamba and attention blocks). Pooling, the final norm, the
# static encoder and the head always train: a pre-trained model never saw the task's label.
FREEZE_CHOICES: tuple[str, ...] = ("none", "embeddings", "backbone")
_FROZEN_MODULES = {"none": (), "embeddings": ("embedding",), "backbone": ("embedding", "mamba", "attention")}


def freeze(model: HyMaTE, part: str) -> list[str]:
    """Mark the parameters of ``part`` (one of ``FREEZE_CHOICES``) ``requires_grad=False`` and
    every other one trainable; returns the frozen parameters' names. Frozen parameters get no
    gradient, so neither the optimiser nor DP-SGD's noise changes them."""
    if part not in _FROZEN_MODULES:
        raise ValueError(f"unknown freeze choice {part!r}; valid: {', '.join(FREEZE_CHOICES)}")
    prefixes = tuple(f"{m}." for m in _FROZEN_MODULES[part])
    frozen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(prefixes))
        if name.startswith(prefixes):
            frozen.append(name)
    return frozen


def normalisation_parameters(model: nn.Module) -> list[str]:
    """State-dict names of the LayerNorm parameters: what FedBN keeps at each site."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    ]


class ContinuousValueEmbedding(nn.Module):
    """CVE: a scalar to a d-vector through ``Linear(1, sqrt d) -> tanh -> Linear(sqrt d, d)``."""

    def __init__(self, d_model: int):
        super().__init__()
        hidden = max(1, int(math.sqrt(d_model)))
        self.inner = nn.Linear(1, hidden)
        self.outer = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x.unsqueeze(-1))))


class TripletEmbedding(nn.Module):
    """(time, variable, value) events to vectors; padded positions come out as exact zeros.

    Zeroing by ``mask`` (rather than relying on ``padding_idx``) matters for DP: Opacus's
    Embedding grad sampler ignores ``padding_idx``, but a zeroed output sends no gradient
    back to the padding row.
    """

    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        self.time_scale = config.time_scale_hours
        self.time = ContinuousValueEmbedding(config.d_model)
        self.value = ContinuousValueEmbedding(config.d_model)
        self.variable = nn.Embedding(config.n_variables + 1, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, times, variables, values, mask) -> torch.Tensor:
        e = self.time(times / self.time_scale) + self.value(values) + self.variable(variables)
        return self.dropout(e * mask.unsqueeze(-1))


class SelectiveSSM(nn.Module):
    """The selective state-space parameters (``A = -exp(A_log)``, ``D``) and the scan over them.

    They sit in a module of their own so that differential privacy can attach one grad
    sampler here: the ``cpu`` scan hands its per-sample gradients of A and D to
    ``self.grad_sink`` during the backward pass, so per-sample clipping costs no second scan.
    """

    def __init__(self, d_inner: int, d_state: int, backend: str):
        super().__init__()
        self.backend = backend
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.grad_sink: ScanGradSink | None = None

    def forward(self, u, delta, B, C, z) -> torch.Tensor:
        return selective_scan(
            u,
            delta,
            -torch.exp(self.A_log),
            B,
            C,
            self.D,
            z=z,
            delta_softplus=True,
            backend=self.backend,
            grad_sink=self.grad_sink,
        )


class MambaMixer(nn.Module):
    """Mamba-1 sequence mixing: gated causal convolution, then a selective scan."""

    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        d, n = config.d_model, config.d_state
        self.d_inner = config.expand * d
        self.dt_rank = math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * self.d_inner, bias=False)
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, config.d_conv, groups=self.d_inner, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.ssm = SelectiveSSM(self.d_inner, n, config.scan_backend)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        self._init_dt()

    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """Mamba's initialisation: softplus(dt bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        xz = self.in_proj(x)
        u, z = xz.chunk(2, dim=-1)
        u = u.transpose(1, 2)  # (B, d_inner, L)
        if u.is_cuda:
            u = causal_conv1d(u, self.conv.weight.squeeze(1), self.conv.bias, activation="silu")
        else:
            u = F.silu(self.conv(u)[..., :length])
        dt, B, C = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.ssm.A_log.shape[1], self.ssm.A_log.shape[1]], dim=-1
        )
        delta = self.dt_proj(dt).transpose(1, 2)
        y = self.ssm(
            u.contiguous(),
            delta.contiguous(),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            z.transpose(1, 2).contiguous(),
        )
        return self.out_proj(y.transpose(1, 2))


class FeedForward(nn.Module):
    """Position-wise MLP with dropout on its output only.

    Random numbers are slow on a CPU (a dropout mask over a (32, 200, 128) tensor costs as
    much as the block's matrix products), so the hidden layer goes without one.
    """

    def __init__(self, d_model: int, dropout: float, hidden_factor: int = 2):
        super().__init__()
        self.up = nn.Linear(d_model, hidden_factor * d_model)
        self.down = nn.Linear(hidden_factor * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class MambaBlock(nn.Module):
    """``x + Mamba(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        self.norm_mixer = nn.LayerNorm(config.d_model)
        self.mixer = MambaMixer(config)
        self.norm_ffn = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm_mixer(x)))
        return x + self.ffn(self.norm_ffn(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over real events only.

    ``need_weights`` returns the head-averaged attention matrix for interpretation; the
    training path uses the fused kernel and never materialises it.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attend: torch.Tensor, need_weights: bool = False):
        b, length, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        key_mask = attend[:, None, None, :]  # (B, 1, 1, L): True = may be attended to
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_heads)
            probs = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
            out = probs @ v
            weights = probs.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out(out.transpose(1, 2).reshape(b, length, d)), weights


class AttentionBlock(nn.Module):
    """Pre-norm Transformer encoder layer: ``x + MHA(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        self.norm_attention = nn.LayerNorm(config.d_model)
        self.attention = SelfAttention(config.d_model, config.n_heads)
        self.norm_ffn = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attend, need_weights: bool = False):
        h, weights = self.attention(self.norm_attention(x), attend, need_weights)
        x = x + self.dropout(h)
        return x + self.ffn(self.norm_ffn(x)), weights


class AttentionPooling(nn.Module):
    """``softmax(u^T tanh(W x))`` over real events; returns the pooled vector and the weights."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.score = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a stay with no events pools to zero
        return torch.einsum("bl,bld->bd", weights, x), weights


class StaySummaries(nn.Module):
    """Per stay and variable: first, last, min, max and mean of its z-scored values, and log1p(count).

    Why: gradient boosting on such summaries matches a sequence model on PhysioNet 2012, and
    handing them to HyMaTE directly lets the sequence layers learn only what they add (a
    probe reached validation AUROC 0.857 after one epoch). They are computed from the batch, so
    they are per stay, need no statistic beyond the (federated) normaliser's, and change
    nothing in the data path or in DP-SGD; the values are already z-scored per variable, so the
    value summaries share that scale, and an unmeasured variable reads 0 with count 0. No
    parameters: Opacus sees only the encoder's ``nn.Linear`` behind it.
    """

    n_summaries = 6

    def __init__(self, n_variables: int):
        super().__init__()
        self.n_variables = n_variables

    def forward(self, variables: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 6 * n_variables): the six summaries, each a block of n_variables columns."""
        b, length = variables.shape
        cells = self.n_variables + 1  # column 0 collects padding and is dropped
        cell = torch.where(mask, variables, torch.zeros_like(variables))
        real = mask.to(values.dtype)
        values = values * real

        def reduce(source: torch.Tensor, how: str, start: float) -> torch.Tensor:
            out = torch.full((b, cells), start, dtype=source.dtype, device=source.device)
            return out.scatter_reduce_(1, cell, source, how, include_self=True)

        count = torch.zeros(b, cells, dtype=values.dtype, device=values.device).scatter_add_(1, cell, real)
        seen = count > 0
        mean = torch.zeros_like(count).scatter_add_(1, cell, values) / count.clamp(min=1)
        low = reduce(values.masked_fill(~mask, math.inf), "amin", math.inf)
        high = reduce(values.masked_fill(~mask, -math.inf), "amax", -math.inf)
        position = torch.arange(length, device=variables.device).expand(b, length)
        # Events are time-sorted: a variable's first and last values sit at its lowest and
        # highest position (clamped into range where it was never measured, then zeroed).
        first = values.gather(1, reduce(position.masked_fill(~mask, length), "amin", length).clamp(max=length - 1))
        last = values.gather(1, reduce(position.masked_fill(~mask, -1), "amax", -1).clamp(min=0))
        zero = torch.zeros_like(count)
        stats = [torch.where(seen, s, zero) for s in (first, last, low, high, mean)] + [torch.log1p(count)]
        return torch.cat([s[:, 1:] for s in stats], dim=-1)


class StaticEncoder(nn.Module):
    """Static features and their missingness indicators (and any extra per-stay features) to one vector."""

    def __init__(self, n_static: int, d_model: int, n_extra: int = 0):
        super().__init__()
        self.inner = nn.Linear(2 * n_static + n_extra, d_model)
        self.outer = nn.Linear(d_model, d_model)

    def forward(
        self, static: torch.Tensor, static_mask: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        present = static_mask.to(static.dtype)
        inputs = [static * present, present] + ([extra] if extra is not None else [])
        return self.outer(torch.tanh(self.inner(torch.cat(inputs, dim=-1))))


@dataclass
class HyMaTEOutput:
    logits: torch.Tensor  # (B,)
    pooling_weights: torch.Tensor  # (B, L)
    attention: torch.Tensor | None  # (B, L, L) of the last attention layer, when asked for


def zero_head(state: dict[str, torch.Tensor]) -> None:
    """Set the classification head's weight and bias in ``state`` (a state dict) to zero, in place."""
    with torch.no_grad():
        for name in ("head.weight", "head.bias"):
            state[name].zero_()


def remove_class_weight(state: dict[str, torch.Tensor], pos_weight: float) -> None:
    """Take the positive class's loss weight out of a trained model's risks, in place: the head's
    bias moves by -log(pos_weight) in ``state`` (a state dict; a model's own shares its tensors).

    Why: with weight w on the positives' loss, the loss-minimising risk is w*p / (w*p + 1 - p),
    so the head learns logit(p) + log w and every predicted risk has its odds inflated w times
    (a sqrt(neg/pos) weight on P12 predicted a mean risk of 0.23 for stays that die at 0.14).
    The weight is there for the gradients of a small site's few positives, not for the
    probabilities. The shift (logit adjustment, Menon et al. 2021) is the same for every stay,
    so no ranking changes: AUROC and AUPRC stay exactly as they were.
    """
    with torch.no_grad():
        state["head.bias"] -= math.log(pos_weight)


class HyMaTE(nn.Module):
    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        self.config = config
        self.embedding = TripletEmbedding(config)
        self.mamba = nn.ModuleList(MambaBlock(config) for _ in range(config.n_mamba_layers))
        self.attention = nn.ModuleList(AttentionBlock(config) for _ in range(config.n_attention_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.pooling = AttentionPooling(config.d_model)
        self.summaries = StaySummaries(config.n_variables) if config.summary_branch else None
        n_summaries = StaySummaries.n_summaries * config.n_variables if config.summary_branch else 0
        self.static = StaticEncoder(config.n_static, config.d_model, n_summaries)
        self.head = nn.Linear(2 * config.d_model, 1)
        if config.head_init == "zero":
            zero_head(dict(self.head.named_parameters(prefix="head")))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,) for a padded batch."""
        return self.run(batch).logits

    def run(self, batch: Batch, need_attention: bool = False) -> HyMaTEOutput:
        summary, weights, attention = self.encode(batch, need_attention)
        return HyMaTEOutput(self.head(summary).squeeze(-1), weights, attention)

    def encode(self, batch: Batch, need_attention: bool = False):
        """The stay as one (B, 2d) vector (pooled events next to statics), with the pooling
        weights and the last attention: what the head reads, and what pre-training trains."""
        mask = batch.mask
        values = torch.asinh(batch.values) if self.config.value_transform == "asinh" else batch.values
        x = self.embedding(batch.times, batch.variables, values, mask)
        for block in self.mamba:
            x = block(x)
        # A stay with no events attends everywhere (its output is discarded by the pooling),
        # so no row of the attention is entirely masked.
        attend = mask | ~mask.any(dim=1, keepdim=True)
        attention = None
        for block in self.attention:
            x, attention = block(x, attend, need_attention)
        pooled, weights = self.pooling(self.norm(x), mask)
        summaries = self.summaries(batch.variables, values, mask) if self.summaries is not None else None
        return torch.cat([pooled, self.static(batch.static, batch.static_mask, summaries)], dim=-1), weights, attention

    @torch.no_grad()
    def variable_importance(self, batch: Batch) -> torch.Tensor:
        """Per-stay importance of each variable, (B, n_variables + 1); column 0 is padding.

        An event's importance is the pooling weight that reaches it: directly, and through
        the last attention layer (``w = alpha @ attention``, one step of attention rollout).
        The event importances of each stay sum to one and are summed per variable.
        """
        out = self.run(batch, need_attention=self.config.n_attention_layers > 0)
        weights = out.pooling_weights
        if out.attention is not None:
            weights = torch.einsum("bl,blk->bk", weights, out.attention) * batch.mask
        importance = torch.zeros(weights.shape[0], self.config.n_variables + 1, dtype=weights.dtype)
        return importance.scatter_add_(1, batch.variables.cpu(), weights.cpu())
