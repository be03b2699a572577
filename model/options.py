"""Config classes as command-line flags and environment variables: the one mechanism of every ``vqtok`` command.

A config class is a dataclass (each field documented in the class docstring's ``Attributes:`` section) or a
pydantic ``BaseModel`` / ``BaseSettings`` (each field's ``description``). Each field ``some_name`` becomes the
flag ``--some-name`` and the environment variable ``{prefix}SOME_NAME``; the flag's help is the field's
documentation followed by ``[env {prefix}SOME_NAME; default ...]``. Precedence: flag > environment variable >
the class's default. ``bool`` fields are ``--name`` / ``--no-name``; ``Literal`` fields have choices;
``X | None`` counts as ``X``; ``tuple[float, ...]`` and ``tuple[int, ...]`` fields take several values
(comma-separated in the environment); ``list[X]`` fields are repeatable flags (comma-separated in the
environment). A field without a default is a required flag, unless its environment variable is set.

Dataclasses and plain pydantic models read the environment here, when the flags are added. A pydantic-settings
class reads its environment itself (its ``env_prefix``), so its flags are only added when given.

This module imports neither torch nor pydantic-settings: the light ``vqtok encode`` / ``decode`` client uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
_MISSING: Any = dataclasses.MISSING


class ConfigField(NamedTuple):
    """What the flag generator reads from one field of a config class."""

    name: str
    annotation: Any
    default: Any  # dataclasses.MISSING when the field has none (or only a pydantic default_factory)
    help: str


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return annotation


def _converter(annotation: Any) -> tuple[Any, Any]:
    """(scalar parser, choices) for a field's type annotation."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if origin is tuple:  # tuple[int, ...] or tuple[float, ...]: each value parsed as the element type
        return typing.get_args(annotation)[0], None
    if origin is list:  # a repeatable flag: each value parsed as the element type
        (element,) = typing.get_args(annotation) or (str,)
        return _converter(element)
    if annotation is bool:
        return _parse_bool, None
    if annotation in (int, float, str, Path):
        return annotation, None
    return str, None  # anything else (a SecretStr, ...) is given as text and converted by the class


def _docstring_attributes(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a class docstring (``a, b: text`` documents both)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    docs: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    names: list[str] = []
    entry_indent: int | None = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        match = re.match(r"\s*([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(.*)", line)
        if match and (entry_indent is None or indent <= entry_indent):
            entry_indent = indent
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                docs[name] = match.group(2).strip()
        elif names:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _is_pydantic(cls: type) -> bool:
    return hasattr(cls, "model_fields") and not dataclasses.is_dataclass(cls)


def _is_settings(cls: type) -> bool:
    """A pydantic-settings class (told by its bases, so this module needs no pydantic-settings import)."""
    return any(base.__name__ == "BaseSettings" and base.__module__.startswith("pydantic_settings")
               for base in cls.__mro__)


def config_fields(cls: type) -> list[ConfigField]:
    """The fields of a dataclass or pydantic model, with their annotation, default and help text."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        docs = _docstring_attributes(cls)
        result = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not _MISSING:
                default = f.default
            elif f.default_factory is not _MISSING:
                default = f.default_factory()
            else:
                default = _MISSING
            result.append(ConfigField(f.name, hints[f.name], default, docs.get(f.name, "")))
        return result
    if _is_pydantic(cls):
        from pydantic_core import PydanticUndefined

        return [
            ConfigField(name, field.annotation,
                        _MISSING if field.default is PydanticUndefined else field.default, field.description or "")
            for name, field in cls.model_fields.items()  # type: ignore[attr-defined]
        ]
    raise TypeError(f"{cls.__name__} is neither a dataclass nor a pydantic model")


def env_prefix_of(cls: type, env_prefix: str | None = None) -> str:
    """The given prefix, else a pydantic-settings class's own ``env_prefix``."""
    if env_prefix is not None:
        return env_prefix
    prefix = getattr(cls, "model_config", {}).get("env_prefix")
    if prefix is None:
        raise ValueError(f"{cls.__name__}: give an env_prefix")
    return str(prefix)


def env_var(env_prefix: str, name: str) -> str:
    """The environment variable of field ``name``: ``<PREFIX><NAME IN CAPITALS>``."""
    return f"{env_prefix}{name.upper()}"


def _show(default: Any) -> str:
    return repr(str(default)) if isinstance(default, Path) else repr(default)


def _from_text(annotation: Any, text: str) -> Any:
    if typing.get_origin(_unwrap_optional(annotation)) is tuple:
        parse, _ = _converter(annotation)
        return tuple(parse(v.strip()) for v in text.split(",") if v.strip())
    if typing.get_origin(_unwrap_optional(annotation)) is list:
        parse, _ = _converter(annotation)
        return [parse(v.strip()) for v in text.split(",") if v.strip()]
    parse, choices = _converter(annotation)
    value = parse(text)
    if choices is not None and value not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str | None = None, *,
                         skip: tuple[str, ...] = (), title: str | None = None,
                         short: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``cls`` (a dataclass or a pydantic model), each naming its environment variable.

    ``short`` gives extra option strings (``{"output": "-o"}``). For a pydantic-settings class ``env_prefix``
    defaults to its own and the environment is left to the class (flags not given stay absent from the args).
    """
    prefix = env_prefix_of(cls, env_prefix)
    reads_env_itself = _is_settings(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} (env {prefix}*)")
    for field in config_fields(cls):
        if field.name in skip:
            continue
        env_name = env_var(prefix, field.name)
        shown = "" if field.default is _MISSING else f"; default {_show(field.default)}"
        help_text = f"{field.help} [env {env_name}{shown}]".lstrip().replace("%", "%%")  # argparse formats help
        options = [*([short[field.name]] if short and field.name in short else []),
                   "--" + field.name.replace("_", "-")]
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if reads_env_itself:
            kwargs["default"] = argparse.SUPPRESS
        else:
            default = field.default
            env_value = os.environ.get(env_name)
            if env_value is not None:
                try:
                    default = _from_text(field.annotation, env_value)
                except ValueError as exc:
                    parser.error(f"environment variable {env_name}={env_value!r}: {exc}")
            if default is _MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        annotation = _unwrap_optional(field.annotation)
        if annotation is bool:
            group.add_argument(*options, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is tuple:  # several values; none at all gives the empty tuple
            parse, _ = _converter(annotation)
            group.add_argument(*options, type=parse, nargs="*", **kwargs)
        elif typing.get_origin(annotation) is list:  # repeat the flag; it replaces the environment's list
            parse, choices = _converter(annotation)
            if not reads_env_itself:
                kwargs["default"] = None if kwargs.get("default") is None else list(kwargs["default"])
            group.add_argument(*options, type=parse, choices=choices, action=_ReplaceAppend, **kwargs)
        else:
            parse, choices = _converter(annotation)
            group.add_argument(*options, type=parse, choices=choices, **kwargs)


class _ReplaceAppend(argparse.Action):
    """``append``, except that the first value given replaces the default (the environment's list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = getattr(namespace, "_given_lists", set())
        items = list(getattr(namespace, self.dest, None) or []) if self.dest in seen else []
        items.append(values)
        seen.add(self.dest)
        namespace._given_lists = seen  # type: ignore[attr-defined]
        setattr(namespace, self.dest, items)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from the args parsed with ``add_config_arguments`` (plus explicit overrides).

    The flags already carry the environment (flag > environment > default); a pydantic-settings class gets
    only the flags given and reads the rest from its environment variables itself.
    """
    names = [f.name for f in config_fields(cls)]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values.update(overrides)
    return cls(**values)


# The names the training command has always used.
add_dataclass_arguments = add_config_arguments
dataclass_from_args = config_from_args
