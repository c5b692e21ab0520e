"""The generic binder: plain data (YAML, overrides) onto the typed schema, and keyword arguments
onto the constructor they are for.

Every check that does not depend on what a key means is done here, once, from the annotations:

- **types** (``int``, ``float``, ``bool``, ``str``, lists, mappings, unions, nested dataclasses;
  YAML 1.1's ``1e-3`` read as a number);
- **choices** (``Literal["stop", "skip"]``);
- **ranges** (``Annotated[int, Range(ge=1)]``; ``finite`` refuses NaN and ±inf);
- **unknown keys**, naming the valid ones, and keys that moved (``moved``: the old key's new
  place);
- **keyword arguments** against the signature of the builder they are for
  (:func:`bind_arguments`, :func:`bind_spec`): unknown, reserved and missing arguments, wrong
  types (by the parameter's default), non-finite numbers and non-positive sizes and rates.

Why not pydantic v2 or OmegaConf's structured configs: OmegaConf has no ``Literal``, no value
ranges and no unions of containers (``Spec | None``, ``bool | str``); pydantic does all of this,
but its messages would need translating back into one line naming the key, and neither binds a
registry entry's keyword arguments to the entry's own signature, which is most of what a config
here holds. The schema stays plain dataclasses; this module is the one place that reads their
annotations.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from unirep.errors import ConfigError
from unirep.registry import Registry

__all__ = [
    "NonEmpty",
    "Pattern",
    "Range",
    "Unique",
    "bind",
    "bind_arguments",
    "bind_spec",
    "check_name",
]


@dataclass(frozen=True)
class Range:
    """A value constraint for ``Annotated[int | float, Range(...)]``.

    Attributes:
        ge, gt, le, lt: bounds (None: unbounded).
        finite: refuse NaN and ±inf.
        text: how the valid values read in a message (default: made from the bounds).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    text: str | None = None

    def holds(self, value: float) -> bool:
        """Whether ``value`` is valid."""
        if self.finite and not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """The valid values, in words."""
        if self.text:
            return self.text
        bounds = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return ("a finite number " if self.finite else "a number ") + " and ".join(bounds)


@dataclass(frozen=True)
class NonEmpty:
    """A constraint for ``Annotated[list[...], NonEmpty()]``: at least one item."""


@dataclass(frozen=True)
class Unique:
    """A constraint for ``Annotated[list[...], Unique()]``: no item twice (a list of names)."""


@dataclass(frozen=True)
class Pattern:
    """A constraint for ``Annotated[str, Pattern(regex, text)]``: the whole string matches."""

    regex: str
    text: str


_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read such strings as numbers."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_number(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _scalar(value: Any, tp: Any, key: str) -> Any:
    """``bool``, ``int``, ``float`` or ``str``: checked, floats converted from integers."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        value = _yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def _union(value: Any, tp: Any, key: str, moved: Mapping[str, str]) -> Any:
    options = typing.get_args(tp)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, key, moved)
        except ConfigError as err:
            if len(options) == 2 and type(None) in options:
                # "X or null": the one real option's message says more (and null is valid)
                here = str(err).startswith(f"config key {key!r}:")
                raise ConfigError(f"{err} (or null)" if here else str(err)) from None
            last = err
    expected = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
    raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}") from last


def coerce(value: Any, tp: Any, key: str, moved: Moved | None = None) -> Any:
    """``value`` checked against the annotation ``tp`` and converted (mappings to dataclasses).

    Raises:
        ConfigError: naming ``key`` (dotted), what was expected and what was given.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *extras = typing.get_args(tp)
        value = coerce(value, inner, key, moved)
        for extra in extras:
            if isinstance(extra, NonEmpty) and not value:
                raise ConfigError(f"config key {key!r}: must hold at least one item, got {value!r}")
            if isinstance(extra, Unique):
                twice = sorted({str(v) for i, v in enumerate(value) if v in value[:i]})
                if twice:
                    raise ConfigError(
                        f"config key {key!r}: {', '.join(map(repr, twice))} given more than "
                        "once; name each once"
                    )
            if isinstance(extra, Pattern) and not re.fullmatch(extra.regex, value):
                raise ConfigError(f"config key {key!r}: {value!r} is not {extra.text}")
            if isinstance(extra, Range):
                for number in value if isinstance(value, list) else [value]:
                    if not extra.holds(number):
                        raise ConfigError(
                            f"config key {key!r}: must be {extra.describe()}, got {value!r}"
                        )
        return value
    if origin in (typing.Union, types.UnionType):
        return _union(value, tp, key, moved)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(
                f"config key {key!r}: {value!r} is not valid; choices: "
                + ", ".join("null" if c is None else str(c) for c in choices)
            )
        return value
    if tp is Any:
        return _yaml_number(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        shorthand = getattr(tp, "from_name", None)  # a Spec written as its bare name
        if shorthand is not None and isinstance(value, str):
            return shorthand(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return bind(tp, value, key, moved)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]", moved) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {
            coerce(k, key_tp, key, moved): coerce(v, val_tp, f"{key}.{k}", moved)
            for k, v in value.items()
        }
    if tp in (bool, int, float, str):
        return _scalar(value, tp, key)
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")


Moved = Callable[[str], "str | None"]
"""Where an unknown dotted key went: a one-line message, or None for a plain unknown key."""


def _moved_message(key: str, value: Any, moved: Moved) -> str | None:
    """The message of the deepest moved key at or under ``key`` (a section's value is searched
    first, so ``model: {backbone: x}`` names ``model.backbone``)."""
    if isinstance(value, dict):
        for child, inner in value.items():
            found = _moved_message(f"{key}.{child}", inner, moved)
            if found is not None:
                return found
    return moved(key)


def bind(cls: type, values: Mapping[str, Any], prefix: str = "", moved: Moved | None = None) -> Any:
    """Dataclass ``cls`` built from a mapping: unknown keys refused (naming the valid ones, or
    where ``moved`` says an old key went), every value checked against its annotation."""
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(
                (moved and _moved_message(key, value, moved))
                or f"unknown config key {key!r}; valid keys here: {', '.join(sorted(known))}"
            )
        kwargs[name] = coerce(value, hints[name], key, moved)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Keyword arguments, against the builder they are for

POSITIVE_ARGUMENTS = frozenset(
    {"lr", "temperature", "eps", "sigma_scale", "threshold", "hidden_mult", "gamma",
     "width_mult", "in_channels", "reduction", "pool", "heads", "scale", "image_size", "height",
     "width", "milestones"}
)  # fmt: skip
"""Arguments (of any component) that must be > 0: rates, sizes, temperatures, divisors."""

NON_NEGATIVE_ARGUMENTS = frozenset(
    {"momentum", "weight_decay", "warmup_steps", "label_smoothing", "min_factor", "seed"}
)
"""Arguments that must be >= 0."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: must be {valid}, got {value!r}")


def _argument(key: str, name: str, value: Any, default: Any) -> None:
    """One argument: its type by the parameter's default, finite, and its range by its name."""
    if isinstance(default, bool):
        _require(isinstance(value, bool), key, value, "true or false")
    elif isinstance(default, int):
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif isinstance(default, float):
        _require(_is_number(value), key, value, "a number")
    elif isinstance(default, str):
        _require(isinstance(value, str), key, value, "a string")
    for number in value if isinstance(value, list) else [value]:
        if not _is_number(number):
            continue
        _require(math.isfinite(number), key, value, "finite")
        if name in POSITIVE_ARGUMENTS:
            _require(number > 0, key, value, "> 0")
        if name in NON_NEGATIVE_ARGUMENTS:
            _require(number >= 0, key, value, ">= 0")


def bind_arguments(
    builder: Callable[..., Any],
    kwargs: Mapping[str, Any],
    key: str,
    what: str,
    supplied: Iterable[str] = (),
) -> None:
    """``kwargs`` against ``builder``'s signature: unknown, reserved (``supplied``: set by unirep
    itself) and missing arguments refused, each value checked by :func:`_argument`.

    Args:
        builder: the function or class the arguments are for.
        kwargs: the configured arguments.
        key: their config key (``weighting.kwargs``), named in messages.
        what: the component, in words (``weighting 'famo'``).
        supplied: the arguments unirep passes itself.
    """
    supplied = tuple(supplied)
    signature = inspect.signature(builder)
    parameters = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    valid = [n for n in parameters if n not in supplied]
    for name, value in kwargs.items():
        arg_key = f"{key}.{name}"
        if name in supplied:
            raise ConfigError(
                f"config key {arg_key!r}: unirep sets {name!r} of {what} itself; remove the key"
            )
        if name not in parameters and not takes_any:
            raise ConfigError(
                f"config key {arg_key!r}: {what} takes no argument {name!r}; valid: "
                f"{', '.join(valid) or 'none'}"
            )
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        _argument(arg_key, name, value, default)
    missing = [
        n for n in valid if parameters[n].default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"config key {key!r}: {what} needs {', '.join(missing)}")


def check_name(registry: Registry[Any], name: str, key: str) -> None:
    """``name`` is registered in ``registry``, else a :class:`ConfigError` listing the valid
    names."""
    if name not in registry:
        raise ConfigError(
            f"config key {key!r}: unknown {registry.kind} {name!r}; "
            f"valid choices: {', '.join(registry.names())}"
        )


def bind_spec(registry: Registry[Any], spec: Any, key: str, supplied: Iterable[str] = ()) -> None:
    """A component choice (``spec.name`` + ``spec.kwargs``): the name registered, the arguments
    bound to the registered builder's signature."""
    check_name(registry, spec.name, f"{key}.name")
    bind_arguments(
        registry.get(spec.name), spec.kwargs, f"{key}.kwargs", f"{registry.kind} {spec.name!r}",
        supplied,
    )  # fmt: skip


def trial(key: str, build: Callable[[], Any]) -> Any:
    """``build()``; its refusal of an argument (``ValueError``, ``TypeError``, ``KeyError``)
    becomes a :class:`ConfigError` naming ``key``: components check their own values."""
    try:
        return build()
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"config key {key!r}: {err}") from err
