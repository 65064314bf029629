"""Per-sample gradients Opacus cannot derive on its own for HyMaTE, registered on import.

Opacus's ``hooks`` mode computes a layer's per-sample gradients from the layer's input
(captured by a forward hook) and the gradient of its output (a full backward hook, which
fires once autograd has the gradients of all of the layer's inputs, i.e. after the layer's
own backward ran). Two samplers are added here:

- ``SelectiveSSM`` (``A_log``, ``D``): its output depends on A and D through the scan's
  recurrence, which no per-layer formula of Opacus covers and which Opacus's functorch
  fallback cannot vmap (the fused scan's autograd Function has no vmap rule, and the
  fallback passes the module only its first input). The scan backends already compute the
  gradient of A and D sample by sample before summing them, and hand those to a
  ``ScanGradSink``; the sampler just reads it, so DP costs no second scan. Opacus calls it
  from the module's full backward hook, i.e. once the gradients of the scan's inputs exist:
  after the ``cpu`` scan's backward (which fills the sink) and, for the ``torch`` scan,
  after the hooks on its per-sample copies of A and D (created later in the forward, so
  autograd runs them first). The scan clears the sink at every forward and the sampler
  after every read, and raises ``GradSinkNotFilledError`` rather than use a stale or
  missing value (e.g. under the ``cuda`` backend, which has no per-sample gradients).
- ``nn.Conv1d``, depthwise case only: Opacus's Conv1d sampler unfolds the input over all
  channels and contracts with an einsum over (out channels x in channels x kernel), then keeps
  the diagonal of groups; for a depthwise conv (groups == channels) that is ``channels``
  times the needed work. The depthwise per-sample gradient is a short sum over kernel taps.
  Every other Conv1d goes to Opacus's own sampler unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import Tensor, nn

from hymate.model import SelectiveSSM
from hymate.ssm import ScanGradSink


@dataclass
class DPGradSink(ScanGradSink):
    """A ``ScanGradSink`` that also says how Opacus scales per-sample gradients.

    The scan fills ``dA``/``dD`` with each sample's share of the gradient of the loss the
    training loop backpropagates. With ``loss_reduction="mean"`` that loss is the batch mean,
    so a sample's share is its own gradient divided by the batch size; Opacus rescales the
    backprops of every other layer by the batch size for that reason, and so must we.
    """

    loss_reduction: str = "mean"


class GradSinkNotFilledError(RuntimeError):
    """Opacus asked for A_log/D's per-sample gradients before the scan's backward provided them."""


def attach_grad_sinks(model: nn.Module, loss_reduction: str = "mean") -> list[SelectiveSSM]:
    """Give every ``SelectiveSSM`` of ``model`` a fresh ``DPGradSink``; returns the modules."""
    modules = [m for m in model.modules() if isinstance(m, SelectiveSSM)]
    for module in modules:
        module.grad_sink = DPGradSink(loss_reduction=loss_reduction)
    return modules


def detach_grad_sinks(model: nn.Module) -> None:
    """Undo ``attach_grad_sinks``: the scans stop handing out per-sample gradients."""
    for module in model.modules():
        if isinstance(module, SelectiveSSM):
            module.grad_sink = None


@register_grad_sampler(SelectiveSSM)
def selective_ssm_grad_sample(
    layer: SelectiveSSM, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``A_log`` and ``D`` from the scan's ``ScanGradSink``.

    ``A = -exp(A_log)``, so ``dL/dA_log = dL/dA * A`` elementwise, sample by sample.
    ``activations`` and ``backprops`` are not needed: the scan already did the work.
    """
    sink = layer.grad_sink
    if not isinstance(sink, DPGradSink):
        raise GradSinkNotFilledError(
            "SelectiveSSM has no DPGradSink: make the model private with hymate.privacy.make_private"
        )
    if sink.dA is None or (layer.D.requires_grad and sink.dD is None):
        raise GradSinkNotFilledError(
            "the scan's backward has not filled the grad sink (backend without per-sample "
            f"gradients, e.g. 'cuda'? this layer's backend is {layer.backend!r})"
        )
    batch = backprops.shape[0]
    if sink.dA.shape[0] != batch:
        raise GradSinkNotFilledError(f"grad sink holds {sink.dA.shape[0]} samples, the batch has {batch}")
    scale = float(batch) if sink.loss_reduction == "mean" else 1.0
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.A_log.requires_grad:
        A = -torch.exp(layer.A_log.detach())
        grads[layer.A_log] = (sink.dA.to(A.dtype) * A).mul_(scale)
    if layer.D.requires_grad:
        grads[layer.D] = sink.dD.to(layer.D.dtype) * scale
    sink.dA = sink.dD = None  # one backward, one read: nothing stale reaches the next step
    return grads


def _is_depthwise(layer: nn.Conv1d) -> bool:
    return (
        layer.groups == layer.in_channels == layer.out_channels
        and layer.stride == (1,)
        and isinstance(layer.padding, tuple)
        and layer.padding_mode == "zeros"
    )


@register_grad_sampler(nn.Conv1d)
def conv1d_grad_sample(layer: nn.Conv1d, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Depthwise Conv1d: ``g[n, c, j] = sum_t dy[n, c, t] * x_pad[n, c, t + j*dilation]``.

    Other Conv1d layers (and the empty batch) go to Opacus's own sampler.
    """
    x = activations[0]
    if not _is_depthwise(layer) or x.shape[0] == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    pad, dilation, k = layer.padding[0], layer.dilation[0], layer.kernel_size[0]
    x = nn.functional.pad(x.to(backprops.dtype), (pad, pad))
    out_len = backprops.shape[-1]
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        # One multiply-and-sum per tap. (An einsum over an unfold() view was no faster, and
        # for some input strides fell back to a loop over the n * C matrices: 10x slower.)
        taps = [(backprops * x[..., j * dilation : j * dilation + out_len]).sum(-1) for j in range(k)]
        grads[layer.weight] = torch.stack(taps, dim=-1).unsqueeze(2)  # (n, C, 1, k)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(-1)
    return grads
