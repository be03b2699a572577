"""Read the model config files published with taming-transformers, latent-diffusion and Chameleon checkpoints.

Those are YAML (``model: params: ddconfig: ...``). PyYAML is not a vqtok dependency, so this module reads the
small subset of YAML these files use, and refuses the rest with the line number:

- block mappings (``key: value``, ``key:`` followed by a more indented block), nested by indentation;
- block sequences (``- item``, scalars or mappings) and flow sequences of scalars (``[1, 1, 2, 2, 4]``, ``[]``);
- scalars: integers, floats (``4.5e-06``; YAML 1.1's rule, as PyYAML reads them), ``true``/``false``,
  ``null``/``~``, quoted and plain strings;
- ``#`` comments.

Anchors, aliases, tags and multi-line strings (``&``, ``*``, ``!``, ``|``, ``>``) are refused: no published
config uses them. A file whose text starts with ``{`` (or named ``*.json``) is read as JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["ConfigFileError", "parse_yaml_subset", "read_config"]

_INT = re.compile(r"^[-+]?\d+$")
# YAML 1.1's float, as PyYAML (which the original projects read their configs with) resolves it: a dot is
# needed and an exponent has a sign, so "4.5e-06" is a float and "1e-4" a string.
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+)([eE][-+]\d+)?$")


class ConfigFileError(ValueError):
    """A config file outside the supported subset, or malformed; the message names the line."""


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote: str | None = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, where: str) -> Any:
    text = text.strip()
    if text == "" or text in ("null", "Null", "NULL", "~"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text[0] in "&*!|>%@`{":
        raise ConfigFileError(f"{where}: {text!r} uses YAML beyond the supported subset (anchors, aliases, tags, "
                              "multi-line strings, flow mappings); give the config as JSON instead")
    if text.startswith("["):
        if not text.endswith("]"):
            raise ConfigFileError(f"{where}: a flow sequence must close on its line: {text!r}")
        inner = text[1:-1].strip()
        return [] if not inner else [_scalar(part, where) for part in inner.split(",")]
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text in (".inf", "-.inf", ".nan"):
        raise ConfigFileError(f"{where}: {text} is not a supported value")
    return text


def parse_yaml_subset(text: str, name: str = "<config>") -> Any:
    """Parse ``text`` (the supported YAML subset, see the module docstring) into dicts, lists and scalars."""
    lines: list[tuple[int, int, str]] = []  # (line number, indent, content)
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ConfigFileError(f"{name}:{number}: tabs in indentation are not supported")
        content = _strip_comment(raw)
        if content.strip() in ("", "---", "..."):
            continue
        lines.append((number, len(content) - len(content.lstrip(" ")), content.strip()))

    position = 0

    def block(indent: int) -> Any:
        nonlocal position
        if position >= len(lines):
            return None
        if lines[position][2].startswith("- ") or lines[position][2] == "-":
            return sequence(lines[position][1])
        return mapping(lines[position][1]) if lines[position][1] >= indent else None

    def sequence(indent: int) -> list[Any]:
        nonlocal position
        items: list[Any] = []
        while position < len(lines) and lines[position][1] == indent and (
                lines[position][2].startswith("- ") or lines[position][2] == "-"):
            number, _, content = lines[position]
            rest = content[1:].strip()
            where = f"{name}:{number}"
            if rest and re.match(r"^[^'\"\[][^:]*:( |$)", rest):
                # "- key: value": a mapping item; its first key sits two columns in.
                lines[position] = (number, indent + 2, rest)
                items.append(mapping(indent + 2))
                continue
            position += 1
            if rest:
                items.append(_scalar(rest, where))
            else:
                items.append(block(indent + 1))
        return items

    def mapping(indent: int) -> dict[str, Any]:
        nonlocal position
        result: dict[str, Any] = {}
        while position < len(lines) and lines[position][1] == indent:
            number, _, content = lines[position]
            where = f"{name}:{number}"
            if content.startswith("- "):
                break
            match = re.match(r"^('[^']*'|\"[^\"]*\"|[^:'\"]+?)\s*:(\s+(.*))?$", content)
            if not match:
                raise ConfigFileError(f"{where}: expected 'key: value', got {content!r}")
            key = match.group(1).strip("'\"")
            value = match.group(3)
            if key in result:
                raise ConfigFileError(f"{where}: key {key!r} appears twice")
            position += 1
            if value is not None and value.strip():
                result[key] = _scalar(value, where)
            elif position < len(lines) and (lines[position][1] > indent or (
                    lines[position][1] == indent and lines[position][2].startswith("- "))):
                result[key] = block(indent + 1)
            else:
                result[key] = None
        if position < len(lines) and lines[position][1] > indent:
            number = lines[position][0]
            raise ConfigFileError(f"{name}:{number}: unexpected indentation")
        return result

    if not lines:
        return {}
    value = block(0)
    if position != len(lines):
        raise ConfigFileError(f"{name}:{lines[position][0]}: unexpected indentation or content")
    return value


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file (JSON, or the YAML subset) as a dict; ``ConfigFileError`` names the line of a problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"{path}: not valid JSON ({exc})") from None
    else:
        data = parse_yaml_subset(text, str(path))
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
    return data
