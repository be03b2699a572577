"""Config dataclasses as command-line flags, with ``VQTOK_*`` environment variables as defaults.

Each dataclass field ``some_name`` becomes the flag ``--some-name`` and the environment variable
``{prefix}SOME_NAME``. Precedence: flag > environment variable > dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _converter(annotation: Any) -> tuple[Any, Any, int | None]:
    """(scalar parser, choices, tuple length or None) for a field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, None
    if origin is tuple:
        return float, None, None
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _converter(inner[0])
    if annotation is bool:
        return _parse_bool, None, None
    return annotation, None, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str,
                            skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls``; defaults come from the environment, else the class."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        annotation = hints[f.name]
        parse, choices, _ = _converter(annotation)
        env_name = f"{env_prefix}{f.name.upper()}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env_value = os.environ.get(env_name)
        if env_value is not None:
            try:
                default = (tuple(float(v) for v in env_value.split(",")) if typing.get_origin(annotation) is tuple
                           else parse(env_value))
            except ValueError as exc:
                parser.error(f"environment variable {env_name}={env_value!r}: {exc}")
        flag = "--" + f.name.replace("_", "-")
        help_text = f"(env {env_name}; default {default!r})"
        if annotation is bool:
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif typing.get_origin(annotation) is tuple:
            group.add_argument(flag, dest=f.name, default=default, type=float, nargs="+", help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=default, type=parse, choices=choices, help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from the parsed flags of ``add_dataclass_arguments`` (plus explicit overrides)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
