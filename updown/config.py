"""Frozen config dataclasses: where every model, decoding and optimiser hyper-parameter is declared, once.

A task takes one config per concern (``net``, ``optimizer``, ``decoding``) instead of repeating each
argument, and LightningCLI exposes every field (``--model.init_args.net.hidden_size 512``). Choice fields are
``Literal`` types and numeric fields restricted number types (:data:`PositiveInt`, :data:`HalfOpenUnitInterval`, ...), so
``--help`` lists the choices and the ranges, and the parser rejects a typo or an out-of-range value at parse
time, naming the option; the same check runs in ``__post_init__`` for code that builds a config directly, so a
bad value fails once, where it enters. The arguments of tasks and datamodules are annotated the same way and
checked by :func:`check_arguments`, and the argparse tools take the same types through :func:`argparse_type`:
each range is declared once, by the annotation.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import operator
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

__all__ = [
    "ClosedUnitInterval", "Config", "HalfOpenUnitInterval", "FeatureEncoderName", "NonNegativeFloat", "NonNegativeInt",
    "PositiveFloat", "PositiveInt", "argparse_type", "check_arguments", "check_choice", "check_value",
    "restricted_number_type",
]  # fmt: skip

C = TypeVar("C", bound="Config")

# The attention blocks a model can put in front of its region features (updown.modules.blocks).
FeatureEncoderName = Literal["se", "nonlocal", "gc", "cot"]

#: A probability that must leave something: dropout, label smoothing, momentum; in [0, 1).
HalfOpenUnitInterval = restricted_number_type(
    "HalfOpenUnitInterval", float, [(">=", 0.0), ("<", 1.0)], join="and"
)

_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<=", operator.eq: "==",
            operator.ne: "!="}  # fmt: skip


def literal_choices(annotation: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        choices = []
        for member in get_args(annotation):
            if member is type(None):
                choices.append(None)
            elif get_origin(member) is Literal:
                choices.extend(get_args(member))
            else:
                return None
        return tuple(choices)
    return None


def _is_restricted(annotation: Any) -> bool:
    return (
        isinstance(annotation, type) and hasattr(annotation, "_restrictions") and hasattr(annotation, "_type")
    )


def restricted_number(annotation: Any) -> type | None:
    """The restricted number type of an annotation (``PositiveInt``, ``PositiveInt | None``, ...), else None."""
    if _is_restricted(annotation):
        return annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        members = [m for m in get_args(annotation) if m is not type(None)]
        if len(members) == 1 and _is_restricted(members[0]):
            return members[0]
    return None


def describe(kind: type) -> str:
    """What a restricted number type accepts, in words: ``an integer > 0``, ``a number >= 0 and < 1``."""
    base = "an integer" if kind._type is int else "a number"
    conditions = f" {kind._join} ".join(f"{_SYMBOLS[op]} {ref:g}" for op, ref in kind._restrictions)
    return f"{base} {conditions}"


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` unless it is one of the ``Literal`` type ``choices`` (for plain arguments; config fields
    are checked by :class:`Config`). ``name`` is the option as the user writes it."""
    allowed = literal_choices(choices)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}; pick one of them.")


def check_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (a ``Literal`` or a restricted number type, possibly ``| None``;
    any other annotation passes), as a plain ``int`` / ``float``. ``name`` is the option as the user writes it.

    Raises:
        ValueError: naming the option, the value and what it must be.
    """
    choices = literal_choices(annotation)
    if choices is not None:
        check_choice(name, value, annotation)
        return value
    kind = restricted_number(annotation)
    if kind is None or value is None:
        return value
    try:
        kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: must be {describe(kind)}.") from None
    return kind._type(value)


def check_arguments(cls: type, arguments: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Check the ``__init__`` arguments of ``cls`` (and of its bases) against their annotations.

    Tasks and datamodules call it with their collected hyper-parameters, so an argument declared as
    ``batch_size: PositiveInt`` is checked when the class is built from Python, as LightningCLI checks it when
    parsing. Returns the arguments with restricted numbers as plain ``int`` / ``float``.

    Args:
        cls: the class whose ``__init__`` chain declares the arguments.
        arguments: argument name -> value.
        prefix: how the user names the arguments, e.g. ``model.init_args``.
    """
    checked = dict(arguments)
    seen = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve: nothing to check from it
            continue
        for name, annotation in hints.items():
            if name in seen or name not in checked or name == "return":
                continue
            seen.add(name)
            checked[name] = check_value(f"{prefix}.{name}", checked[name], annotation)
    return checked


def argparse_type(annotation: Any):
    """An argparse ``type=`` function for a restricted number type (or plain ``int`` / ``float``): parses the
    string and refuses an out-of-range value, so argparse reports ``argument --n: must be an integer > 0 (got
    '0')`` on one ``error:`` line."""
    kind = restricted_number(annotation) or annotation
    base = getattr(kind, "_type", kind)
    what = describe(kind) if kind is not base else ("an integer" if base is int else "a number")

    def parse(text: str):
        try:
            value = base(text)
            if kind is not base:
                kind(value)
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
        return value

    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the config dataclasses: checks ``Literal`` and restricted-number fields and reads itself from
    checkpoints' dicts."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = check_value(f"{type(self).__name__}.{field.name}", value, hints.get(field.name))
            if checked is not value:
                # Plain int / float, not the parser's restricted subclass: checkpoints and YAML stay plain.
                object.__setattr__(self, field.name, checked)

    @classmethod
    def coerce(cls: type[C], value: C | dict | None) -> C:
        """``value`` as this config: itself, built from a dict (configs and checkpoints store dicts), or the
        defaults for None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"{cls.__name__}: unknown field(s) {unknown}; the fields are {sorted(known)}."
                )
            return cls(**value)
        raise ValueError(f"{cls.__name__}: expected a {cls.__name__} or a dict of its fields, got {value!r}.")

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
