"""Interval bound propagation (Gowal et al., 2018): sound elementwise bounds on a network's logits over an L∞ ball.

``interval_bounds(model, x, eps)`` traces the model with ``torch.fx`` and propagates an interval [l, u] per
activation: affine layers (Linear, Conv2d with any padding mode, BatchNorm in eval mode with running statistics, the
zoo's ``Normalize``) map the centre and the absolute weights map the radius; monotone ones (ReLU, max and average
pooling, flatten, reshapes) map both ends; additions and subtractions (``torch.add``'s ``alpha`` too) combine the
intervals. Every call's arguments are checked: a layer, function, method or argument that is not understood is refused
by name (:class:`UnsupportedLayer`), never guessed — a bound that skipped a layer would certify what is not robust.

``margin_bounds(model, x, y, eps)``: lower bounds of the margins z_y − z_j. By default the last Linear layer is folded
into them (specification elision: (W_y − W_j)·h + b_y − b_j bounded over h's interval), never looser than the naive
l_y − u_j (``elide=False``, or a model whose output is not a Linear layer).

``verified(model, x, y, eps)``: per point, whether every margin's lower bound is positive over the whole ball (a sound
certificate: a point verified here is robust to every attack in the threat model).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base.errors import UserError
from regdefense.models._registry import Normalize

Interval = tuple[Tensor, Tensor]

#: modules applied to both ends of an interval because they are monotone (non-decreasing) elementwise or in their max
MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_POOL = {"kernel_size", "stride", "padding", "ceil_mode"}
#: monotone functions, with the keyword arguments each may take (and never an interval as one)
MONOTONE_FN: dict[Any, set[str]] = {
    F.relu: {"inplace"},
    torch.relu: set(),
    torch.flatten: {"start_dim", "end_dim"},
    F.max_pool2d: _POOL | {"dilation", "return_indices"},
    F.avg_pool2d: _POOL | {"count_include_pad", "divisor_override"},
    F.adaptive_avg_pool2d: {"output_size"},
}
#: monotone tensor methods, the same way
MONOTONE_METHODS: dict[str, set[str]] = {
    "relu": set(),
    "flatten": {"start_dim", "end_dim"},
    "view": set(),
    "reshape": set(),
    "contiguous": {"memory_format"},
    "float": {"memory_format"},
}
#: arguments a supported call takes only with this value
FIXED = {"return_indices": False}
SUPPORTED = (
    "Linear, Conv2d, BatchNorm (eval, running statistics), ReLU, max/average pooling, Flatten, Identity, "
    "Dropout (eval), Normalize, additions and subtractions"
)


class UnsupportedLayer(UserError):
    """The model holds a layer interval bound propagation does not support."""


class _Box(NamedTuple):
    """An interval in the traced graph (told apart from a constant tuple such as a size)."""

    lo: Tensor
    hi: Tensor


def _affine(module: nn.Module, box: _Box) -> _Box:
    c, r = (box.hi + box.lo) / 2, (box.hi - box.lo) / 2
    if isinstance(module, nn.Linear):
        c, r = module(c), F.linear(r, module.weight.abs())
    elif isinstance(module, nn.Conv2d):
        # the module's own padding (zeros, or reflect/replicate/circular: a selection of input elements, so the radius
        # is padded the same way), then the convolution
        c, r = module(c), module._conv_forward(r, module.weight.abs(), None)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        name = type(module).__name__
        if module.training:
            raise UnsupportedLayer(f"{name} in train mode: bounds need the model in eval mode")
        if module.running_var is None:
            raise UnsupportedLayer(
                f"{name} without running statistics (track_running_stats=False): it normalises with each batch's "
                f"statistics even in eval mode"
            )
        c = module(c)
        scale = (module.weight if module.weight is not None else 1) / torch.sqrt(module.running_var + module.eps)
        r = r * torch.as_tensor(scale, device=r.device).abs().view((1, -1) + (1,) * (r.dim() - 2))
    elif isinstance(module, Normalize):
        if not (module.std > 0).all():
            raise UnsupportedLayer("Normalize with a std that is not positive")
        return _Box(module(box.lo), module(box.hi))  # (x − mean)/std with std > 0: increasing
    else:
        raise UnsupportedLayer(type(module).__name__)
    return _Box(c - r, c + r)


def _fold(module: nn.Linear, box: _Box, spec: Tensor) -> _Box:
    """Bounds of spec·(W h + b) over h's interval, with spec·W taken first (specification elision)."""
    if box.lo.dim() != 2:
        raise UnsupportedLayer(f"a last Linear layer on {box.lo.dim()}-d inputs (logits must be batch × classes)")
    w = spec @ module.weight  # (batch, specs, hidden)
    b = spec @ module.bias if module.bias is not None else 0
    c, r = (box.hi + box.lo) / 2, (box.hi - box.lo) / 2
    c, r = torch.einsum("bsh,bh->bs", w, c) + b, torch.einsum("bsh,bh->bs", w.abs(), r)
    return _Box(c - r, c + r)


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


def _name(node: torch.fx.Node) -> str:
    return str(node.target) if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _last_linear(graph: torch.fx.GraphModule) -> torch.fx.Node | None:
    out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    if isinstance(out, torch.fx.Node) and out.op == "call_module" and len(out.users) == 1:
        if isinstance(graph.get_submodule(str(out.target)), nn.Linear):
            return out
    return None


def last_linear(model: nn.Module, graph: torch.fx.GraphModule | None = None) -> str | None:
    """The name of the Linear layer whose output is the model's, which :func:`margin_bounds` folds into the margins
    (specification elision); None when the output is anything else (the margins then come from naive bounds)."""
    node = _last_linear(graph if graph is not None else trace(model))
    return str(node.target) if node is not None else None


def interval_bounds(
    model: nn.Module, x: Tensor, eps: float, graph: torch.fx.GraphModule | None = None, spec: Tensor | None = None
) -> Interval:
    """Lower and upper bounds of ``model``'s outputs for every input in the L∞ ball of radius ``eps`` around ``x``
    intersected with [0, 1]. Raises :class:`UnsupportedLayer` naming a layer, call or argument it cannot bound.

    :param graph: ``trace(model)``, when bounds are taken many times (training): tracing costs more than bounding.
    :param spec: a (batch, specs, outputs) matrix C: bounds of C·z instead of z, folded into the last layer when it is
        a Linear one (auto_LiRPA's ``C``; Gowal et al.'s elision), else applied to z's interval."""
    graph = trace(model) if graph is None else graph
    fold = _last_linear(graph) if spec is not None else None
    env: dict[str, Any] = {}

    def get(a: Any) -> Any:  # a node's value, in nested arguments too
        return torch.fx.node.map_arg(a, lambda n: env[n.name])

    inputs = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedLayer(f"IBP bounds do not support a model of {len(inputs)} inputs")
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = _Box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
        elif node.op == "output":
            out = get(node.args[0])
            if not isinstance(out, _Box):
                raise UnsupportedLayer(f"IBP bounds do not support a model whose output is a {type(out).__name__}")
            if spec is not None and fold is None:
                c, r = (out.hi + out.lo) / 2, (out.hi - out.lo) / 2
                c, r = torch.einsum("bsk,bk->bs", spec, c), torch.einsum("bsk,bk->bs", spec.abs(), r)
                out = _Box(c - r, c + r)
            return out.lo, out.hi
        else:
            try:
                if fold is not None and node is fold:
                    linear = graph.get_submodule(str(node.target))
                    assert spec is not None and isinstance(linear, nn.Linear)
                    env[node.name] = _fold(linear, get(node.args[0]), spec)
                else:
                    env[node.name] = _step(graph, node, get)
            except UnsupportedLayer:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise UnsupportedLayer(
                    f"IBP bounds failed at '{node.name}' ({_name(node)}): {type(exc).__name__}: {exc}"
                ) from None
    raise UnsupportedLayer("the traced model has no output")


def _step(graph: torch.fx.GraphModule, node: torch.fx.Node, get: Any) -> Any:
    """One node of the graph on intervals (and on the constants beside them: sizes, numbers)."""
    args, kwargs = [get(a) for a in node.args], {k: get(v) for k, v in node.kwargs.items()}
    name = _name(node)

    def check(allowed: set[str]) -> _Box:
        """The first argument is the interval; the others are constants, keywords among ``allowed``."""
        for k, v in kwargs.items():
            if k not in allowed or _interval_or_dtype(v) or (k in FIXED and v != FIXED[k]):
                shown = "an interval" if isinstance(v, _Box) else repr(v)
                raise UnsupportedLayer(f"IBP bounds do not support the argument '{k}'={shown} of '{name}'")
        if not args or not isinstance(args[0], _Box) or _interval_or_dtype(args[1:]):
            raise UnsupportedLayer(f"IBP bounds do not support the arguments of '{name}' ({node.op} '{node.name}')")
        return args[0]

    if node.op == "call_module":
        module = graph.get_submodule(str(node.target))
        box = check(set())
        if len(args) != 1:
            raise UnsupportedLayer(f"IBP bounds do not support layer '{node.target}' called with more than its input")
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            raise UnsupportedLayer(
                f"IBP bounds do not support dropout in train mode (layer '{node.target}'): the two ends of an "
                f"interval would be dropped differently; bound the model in eval mode or without dropout"
            )
        if isinstance(module, nn.AvgPool2d) and (module.divisor_override or 1) <= 0:
            raise UnsupportedLayer(f"IBP bounds do not support a divisor_override <= 0 (layer '{node.target}')")
        if isinstance(module, nn.MaxPool2d) and module.return_indices:
            raise UnsupportedLayer(f"IBP bounds do not support MaxPool2d(return_indices=True) (layer '{node.target}')")
        if isinstance(module, MONOTONE) or (isinstance(module, nn.Sequential) and len(module) == 0):
            return _Box(module(box.lo), module(box.hi))
        try:
            return _affine(module, box)
        except UnsupportedLayer as exc:
            raise UnsupportedLayer(
                f"IBP bounds do not support {exc} (layer '{node.target}'); supported: {SUPPORTED}"
            ) from None
    if node.op == "call_function" and node.target in (operator.add, operator.sub, torch.add, torch.sub):
        if kwargs.keys() - {"alpha"} or len(args) != 2 or not isinstance(kwargs.get("alpha", 1), (int, float)):
            raise UnsupportedLayer(f"IBP bounds do not support the arguments of '{name}' ({kwargs or args[2:]})")
        k = kwargs.get("alpha", 1) * (-1 if node.target in (operator.sub, torch.sub) else 1)
        return _add(args[0], _scale(args[1], k))
    if node.op == "call_function" and node.target in MONOTONE_FN:
        box, fn = check(MONOTONE_FN[node.target]), node.target
        assert callable(fn)
        if fn is F.avg_pool2d and (kwargs.get("divisor_override") or (args[6:7] or [1])[0] or 1) <= 0:
            raise UnsupportedLayer(f"IBP bounds do not support a divisor_override <= 0 ('{node.name}')")
        return _Box(fn(box.lo, *args[1:], **kwargs), fn(box.hi, *args[1:], **kwargs))
    if node.op == "call_method" and node.target in MONOTONE_METHODS:
        box = check(MONOTONE_METHODS[str(node.target)])
        lo, hi = (getattr(t, str(node.target))(*args[1:], **kwargs) for t in box)
        return _Box(lo, hi)
    if node.op == "call_method" and node.target == "size":
        return check({"dim"}).lo.size(*args[1:], **kwargs)
    if node.op == "get_attr":
        raise UnsupportedLayer(f"IBP bounds do not support a parameter used directly ('{node.target}')")
    raise UnsupportedLayer(f"IBP bounds do not support the operation '{name}' ({node.op})")


def _interval_or_dtype(v: Any) -> bool:
    """Whether an argument is, or holds, an interval or a dtype (reinterpreting bits: not monotone)."""
    if isinstance(v, (_Box, torch.dtype)):
        return True
    return isinstance(v, (tuple, list)) and any(_interval_or_dtype(a) for a in v)


def _scale(v: Any, k: float) -> Any:
    if isinstance(v, _Box):
        return _Box(k * v.lo, k * v.hi) if k >= 0 else _Box(k * v.hi, k * v.lo)
    return v if k == 1 else k * v


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _Box) and isinstance(b, _Box):
        return _Box(a.lo + b.lo, a.hi + b.hi)
    if isinstance(a, _Box):
        return _Box(a.lo + b, a.hi + b)
    if isinstance(b, _Box):
        return _Box(a + b.lo, a + b.hi)
    return a + b  # constants: sizes, numbers


def margin_bounds(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, graph: torch.fx.GraphModule | None = None, elide: bool = True
) -> Tensor:
    """Lower bounds of z_y − z_j over the ball, (batch, classes), 0 at j = y. ``elide``: fold the last Linear layer
    into the margins (Gowal et al.'s specification elision), when the output is one (see :func:`last_linear`); else
    (or ``elide=False``) the naive l_y − u_j of :func:`interval_bounds`."""
    graph = trace(model) if graph is None else graph
    y = y.view(-1, 1).to(x.device)
    last = _last_linear(graph) if elide else None
    if last is not None:
        linear = graph.get_submodule(str(last.target))
        assert isinstance(linear, nn.Linear)
        eye = torch.eye(linear.out_features, device=x.device, dtype=x.dtype)
        lo, _ = interval_bounds(model, x, eps, graph, spec=eye[y[:, 0]].unsqueeze(1) - eye)  # rows e_y − e_j
        return lo
    lo, hi = interval_bounds(model, x, eps, graph)
    return (lo.gather(1, y) - hi).scatter(1, y, 0.0)


def worst_case_logits(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, graph: torch.fx.GraphModule | None = None, elide: bool = True
) -> Tensor:
    """The logits IBP training attacks, as the reference code builds them: the upper bound of z_j − z_y for every
    class j, 0 for the true one (its cross-entropy is Gowal et al.'s verified loss)."""
    return -margin_bounds(model, x, y, eps, graph, elide)


def verified(model: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int = 256, elide: bool = True) -> Tensor:
    """Per point: every margin's lower bound (:func:`margin_bounds`) is positive over the ball (certified).

    The model's own output at ``x`` must lie within the bounds; if it does not, a layer was not bounded as it
    computes and :class:`UnsupportedLayer` is raised rather than any certificate given."""
    oks, graph = [], trace(model)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size].view(-1, 1).to(x.device)
            m = margin_bounds(model, xb, yb, eps, graph, elide)
            z = model(xb)
            actual = z.gather(1, yb) - z
            if (m > actual + 1e-4 * (1 + actual.abs())).any():
                raise UnsupportedLayer(
                    "the bounds do not contain the model's own output: a layer is not bounded as "
                    "it computes, no certificate is given"
                )
            oks.append((m.scatter(1, yb, float("inf")).min(1).values > 0).cpu())
    return torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)
