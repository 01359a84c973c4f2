"""The typed-field engine under the run configuration: fields with help and limits, values coerced to a field's type
(with a safe evaluator for ``8/255``-style text), dataclasses built from dicts, and their self-description.

The schema (:mod:`regdefense.base.config`) and every defense's ``Config`` are dataclasses whose fields come from
:func:`option`; nothing here knows a section or a key of the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import types
import typing
from dataclasses import field, fields
from typing import Any, Literal

from regdefense.base.errors import ConfigError, did_you_mean

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = MISSING,
    epoch: Literal["starts", "ends", "every"] | None = None,
) -> Any:
    """A dataclass field with a help string and optional numeric limits (``ge``, ``gt``, ``le``).

    :param epoch: the field is a point in the run, counted in epochs, that a run shorter than it never reaches:
        ``"starts"`` (something switches on after this many epochs: a burn-in), ``"ends"`` (a ramp or warm-up over
        this many epochs), ``"every"`` (something happens every this many epochs). :func:`unreached` reports them.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "epoch": epoch}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _numeric(op):
    """Arithmetic on plain numbers only, with bounded powers: ``8/255`` and ``2**-3`` yes, ``'x'*10**9`` or
    ``9**9**9`` (which would take memory or hours to compute) no."""

    def apply(a, b):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            raise ValueError("arithmetic works on numbers only")
        if op is operator.pow and (abs(b) > 64 or abs(a) > 2**64):
            raise ValueError("powers are limited to exponents within ±64")
        return op(a, b)

    return apply


_BINOPS = {
    k: _numeric(op)
    for k, op in {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.Pow: operator.pow,
        ast.FloorDiv: operator.floordiv,
    }.items()
}


def safe_eval(node_or_text: ast.AST | str) -> Any:
    """Evaluate a literal (numbers, strings, booleans, None, lists, tuples, dicts) with +-*/ arithmetic.

    ``"8/255"`` gives ``0.0313...``; names other than true/false/none are rejected, so nothing is executed.
    """
    if isinstance(node_or_text, str):
        try:
            return safe_eval(ast.parse(node_or_text.strip(), mode="eval").body)
        except (RecursionError, MemoryError):  # "-" * 2000 + "1": nesting no value needs
            raise ValueError(f"too deeply nested to be a value ({len(node_or_text)} characters)") from None
    node = node_or_text
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[node.id.lower()]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = safe_eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](safe_eval(node.left), safe_eval(node.right))
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [safe_eval(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {safe_eval(k): safe_eval(v) for k, v in zip(node.keys, node.values) if k is not None}
    raise ValueError(f"not a literal value: {ast.unparse(node)}")


def _parse_text(text: str) -> Any:
    try:
        return safe_eval(text)
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
        return text  # a bare string such as cosine or runs/x


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a ``-o`` string) to the field type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal and value in typing.get_args(tp):
        return value  # e.g. the choice "none", which must not be parsed as None
    if isinstance(value, str) and tp is not str:
        value = _parse_text(value)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return coerce(value, opt, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(
            f"{key} must be one of {_type_name(tp)}, got {value!r}{did_you_mean(value, map(str, typing.get_args(tp)))}"
        )
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [_parse_text(v) for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, key) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [coerce(value, item, key)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("yes", "on", "1", "no", "off", "0"):
            return value.lower() in ("yes", "on", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def check_limits(cfg: Any, prefix: str) -> None:
    """Apply the ``ge``/``gt``/``le`` limits of every field of dataclass instance ``cfg``."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        meta = f.metadata
        key = f"{prefix}.{f.name}"
        if meta.get("ge") is not None and value < meta["ge"]:
            raise ConfigError(f"{key} must be >= {meta['ge']}, got {value}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"{key} must be > {meta['gt']}, got {value}")
        if meta.get("le") is not None and value > meta["le"]:
            raise ConfigError(f"{key} must be <= {meta['le']}, got {value}")


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``: unknown keys, wrong types and bad values raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{prefix}] must be a table of key = value pairs, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{prefix}.{key}'{did_you_mean(key, names)}; "
                f"valid keys of [{prefix}]: {', '.join(names)}"
            )
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    try:
        cfg = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[{prefix}] {exc}") from None
    check_limits(cfg, prefix)
    return cfg


def replace(cfg: Any, values: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass instance ``cfg`` with ``values`` applied (validated like :func:`build`)."""
    merged = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    merged.update(values)
    return build(type(cfg), merged, prefix)


def describe(cls: type) -> list[dict[str, Any]]:
    """Field name, type, default and help of a config dataclass, for ``plugins show`` and docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        limits = ", ".join(
            f"{op} {f.metadata[key]:g}"
            for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
            if f.metadata.get(key) is not None
        )
        typ = hints[f.name]
        if typing.get_origin(typ) is Literal:
            limits = "one of " + ", ".join(map(str, typing.get_args(typ)))
        rows.append(
            {
                "name": f.name,
                "type": _type_name(typ),
                "default": default,
                "limits": limits,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows
