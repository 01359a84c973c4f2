"""Interval bound propagation (Gowal et al., 2018): sound elementwise bounds on a network's logits over an L∞ ball.

``interval_bounds(model, x, eps)`` traces the model with ``torch.fx`` and propagates an interval [l, u] per
activation: affine layers (Linear, Conv2d, BatchNorm in eval mode, the zoo's ``Normalize``) map the centre and
the absolute weights map the radius; monotone ones (ReLU, max and average pooling, flatten, reshapes) map both ends;
residual additions add the intervals. Any other layer or function is refused by name, never guessed — a bound that
skipped a layer would certify what is not robust.

``verified(model, x, y, eps)``: per point, whether the lower bound of the true logit exceeds the upper bound of
every other logit over the whole ball (a sound, loose certificate: a point verified here is robust to every attack
in the threat model).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.errors import UserError
from regdefense.models._registry import Normalize

Interval = tuple[Tensor, Tensor]

#: modules applied to both ends of an interval because they are monotone (non-decreasing) elementwise or in their max
MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
#: functions and methods treated the same way
MONOTONE_FN = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
MONOTONE_METHODS = {"relu", "flatten", "view", "reshape", "contiguous", "float"}


class UnsupportedLayer(UserError):
    """The model holds a layer interval bound propagation does not support."""


def _affine(module: nn.Module, lo: Tensor, hi: Tensor) -> Interval:
    c, r = (hi + lo) / 2, (hi - lo) / 2
    if isinstance(module, nn.Linear):
        c, r = module(c), F.linear(r, module.weight.abs())
    elif isinstance(module, nn.Conv2d):
        c = module(c)
        r = F.conv2d(r, module.weight.abs(), None, module.stride, module.padding, module.dilation, module.groups)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.training:
            raise UnsupportedLayer(f"{type(module).__name__} in train mode: bounds need the model in eval mode")
        c = module(c)
        assert module.running_var is not None
        scale = (module.weight if module.weight is not None else 1) / torch.sqrt(module.running_var + module.eps)
        shape = (1, -1) + (1,) * (r.dim() - 2)
        r = r * torch.as_tensor(scale, device=r.device).abs().view(shape)
    elif isinstance(module, Normalize):
        return module(lo), module(hi)  # (x − mean)/std with std > 0: increasing
    else:
        raise UnsupportedLayer(type(module).__name__)
    return c - r, c + r


class _Tracer(torch.fx.Tracer):
    """Keeps the zoo's ``Normalize`` whole (an increasing map), as the built-in layers are."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model's graph for :func:`interval_bounds` (its layers are the model's own: later weights are seen)."""
    try:
        tracer = _Tracer()
        return torch.fx.GraphModule(model, tracer.trace(model))
    except Exception as exc:  # control flow on values, a ScriptModule, an exported program
        raise UnsupportedLayer(f"{type(model).__name__} cannot be traced for bounds ({type(exc).__name__})") from None


def interval_bounds(model: nn.Module, x: Tensor, eps: float, graph: torch.fx.GraphModule | None = None) -> Interval:
    """Lower and upper bounds of ``model``'s outputs for every input in the L∞ ball of radius ``eps`` around ``x``
    intersected with [0, 1]. Raises :class:`UnsupportedLayer` naming a layer it cannot bound.

    :param graph: ``trace(model)``, when bounds are taken many times (training): tracing costs more than bounding."""
    graph = graph if graph is not None else trace(model)
    modules = dict(graph.named_modules())
    env: dict[str, Any] = {}

    def get(a: Any) -> Any:
        return env[a.name] if isinstance(a, torch.fx.Node) else a

    for node in graph.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = ((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
        elif node.op == "output":
            return get(node.args[0])
        elif node.op == "call_module":
            module = modules[node.target]
            lo, hi = get(node.args[0])
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                raise UnsupportedLayer(
                    f"IBP bounds do not support dropout in train mode (layer '{node.target}'): the two ends of an "
                    f"interval would be dropped differently; bound the model in eval mode or without dropout"
                )
            if isinstance(module, MONOTONE) or (isinstance(module, nn.Sequential) and len(module) == 0):
                env[node.name] = (module(lo), module(hi))
            else:
                try:
                    env[node.name] = _affine(module, lo, hi)
                except UnsupportedLayer as exc:
                    raise UnsupportedLayer(
                        f"IBP bounds do not support {exc} (layer '{node.target}'); supported: Linear, Conv2d, "
                        f"BatchNorm (eval), ReLU, max/average pooling, Flatten, Identity, Dropout (eval), Normalize, "
                        f"residual additions"
                    ) from None
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = get(node.args[0]), get(node.args[1])
            env[node.name] = _add(a, b)
        elif node.op == "call_function" and node.target in MONOTONE_FN:
            lo, hi = get(node.args[0])
            rest = [get(a) for a in node.args[1:]]
            env[node.name] = (node.target(lo, *rest, **node.kwargs), node.target(hi, *rest, **node.kwargs))
        elif node.op == "call_method" and node.target in MONOTONE_METHODS:
            lo, hi = get(node.args[0])
            rest = [get(a) for a in node.args[1:]]
            env[node.name] = (getattr(lo, node.target)(*rest, **node.kwargs), getattr(hi, node.target)(*rest))
        elif node.op == "call_method" and node.target == "size":
            env[node.name] = get(node.args[0])[0].size(*[get(a) for a in node.args[1:]])
        elif node.op == "get_attr":
            raise UnsupportedLayer(f"IBP bounds do not support a parameter used directly ('{node.target}')")
        else:
            name = getattr(node.target, "__name__", str(node.target))
            raise UnsupportedLayer(f"IBP bounds do not support the operation '{name}' ({node.op})")
    raise UnsupportedLayer("the traced model has no output")


def _add(a: Any, b: Any) -> Interval:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[0] + b[0], a[1] + b[1]
    if isinstance(a, tuple):
        return a[0] + b, a[1] + b
    if isinstance(b, tuple):
        return a + b[0], a + b[1]
    raise UnsupportedLayer("an addition of two constants")


def worst_case_logits(lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
    """The logits IBP training attacks: the upper bound for every class but the true one, the lower bound for it."""
    out = hi.clone()
    out.scatter_(1, y.view(-1, 1), lo.gather(1, y.view(-1, 1)))
    return out


def verified(model: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int = 256) -> Tensor:
    """Per point: the true logit's lower bound exceeds every other logit's upper bound over the ball (certified)."""
    oks, graph = [], trace(model)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            lo, hi = interval_bounds(model, x[i : i + batch_size], eps, graph)
            worst = worst_case_logits(lo, hi, y[i : i + batch_size].to(lo.device))
            true = worst.gather(1, y[i : i + batch_size].view(-1, 1).to(lo.device))
            others = worst.scatter(1, y[i : i + batch_size].view(-1, 1).to(lo.device), float("-inf"))
            oks.append((true.squeeze(1) > others.max(1).values).cpu())
    return torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)
