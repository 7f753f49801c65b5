"""Frozen config dataclasses: where every model, decoding and optimiser hyper-parameter is declared, once.

A task takes one config per concern (``net``, ``optimizer``, ``decoding``) instead of repeating each
argument, and LightningCLI exposes every field (``--model.init_args.net.hidden_size 512``). Choice fields are
``Literal`` types, so ``--help`` lists the choices and the parser rejects a typo at parse time; the same check
runs in ``__post_init__`` for code that builds a config directly, so a bad value fails once, where it enters.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

C = TypeVar("C", bound="Config")

# The attention blocks a model can put in front of its region features (updown.modules.blocks).
FeatureEncoderName = Literal["se", "nonlocal", "gc", "cot"]


def _literal_choices(annotation: Any) -> tuple | None:
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


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` unless it is one of the ``Literal`` type ``choices`` (for plain arguments; config fields
    are checked by :class:`Config`). ``name`` is the option as the user writes it."""
    allowed = _literal_choices(choices)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}; pick one of them.")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the config dataclasses: checks ``Literal`` fields and reads itself from checkpoints' dicts."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            choices = _literal_choices(hints.get(field.name))
            value = getattr(self, field.name)
            if choices is not None and value not in choices:
                raise ValueError(
                    f"{type(self).__name__}.{field.name}={value!r} is not one of {choices}; pick one of them."
                )

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
