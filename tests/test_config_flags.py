"""One mechanism for every command's flags and environment variables (``vqtok.model.options``): each flag's help
names its environment variable, the variable changes the parsed value, and the flag beats the variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vqtok.model.options import ConfigField, _unwrap_optional, add_config_arguments, config_fields, config_from_args

REPO = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, tuple[Callable[[], argparse.ArgumentParser], list[tuple[type, str]], list[str]]]:
    """command -> (its parser, its (config class, env prefix) pairs, positional arguments it needs)."""
    from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
    from vqtok.model.evaluate import EvaluateConfig
    from vqtok.model.evaluate import build_parser as evaluate_parser
    from vqtok.model.importers.command import ImportConfig
    from vqtok.model.importers.command import build_parser as import_parser
    from vqtok.model.train import TrainConfig
    from vqtok.model.train import build_parser as train_parser
    from vqtok.service.__main__ import build_parser as serve_parser
    from vqtok.service.client import (
        ClientConfig,
        DecodeOptions,
        EncodeOptions,
        build_decode_parser,
        build_encode_parser,
    )
    from vqtok.service.settings import Settings

    return {
        "serve": (serve_parser, [(Settings, "VQTOK_")], []),
        "train": (train_parser, [(TrainConfig, "VQTOK_TRAIN_"), (NetworkConfig, "VQTOK_MODEL_"),
                                 (CodebookTrainingConfig, "VQTOK_MODEL_")], []),
        "evaluate": (evaluate_parser, [(EvaluateConfig, "VQTOK_EVALUATE_")], []),
        "encode": (build_encode_parser, [(EncodeOptions, "VQTOK_ENCODE_"), (ClientConfig, "VQTOK_")], ["a.png"]),
        "decode": (build_decode_parser, [(DecodeOptions, "VQTOK_DECODE_"), (ClientConfig, "VQTOK_")], ["t.json"]),
        "import": (import_parser, [(ImportConfig, "VQTOK_IMPORT_")], []),
    }


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VQTOK_") or name == "PORT":
            monkeypatch.delenv(name)
    monkeypatch.setenv("VQTOK_DECODE_OUTPUT", "base.png")  # decode's one required flag, given by its variable
    for name, value in (("SOURCE", "chameleon"), ("WEIGHTS", "w.ckpt"), ("OUT", "out")):  # import's required ones
        monkeypatch.setenv(f"VQTOK_IMPORT_{name}", value)


def _two_values(field: ConfigField) -> tuple[str, list[str], Any, Any]:
    """(environment text, flag arguments, value from the environment, value from the flag), both not the default."""
    annotation = _unwrap_optional(field.annotation)
    default = None if field.default is dataclasses.MISSING else field.default
    flag = "--" + field.name.replace("_", "-")
    if field.name == "default_size":  # validated by Settings: a size
        return "64", [flag, "96"], "64", "96"
    if annotation is bool:
        return str(not default).lower(), [flag if default else f"--no-{flag[2:]}"], not default, bool(default)
    if typing.get_origin(annotation) is typing.Literal:
        others = [c for c in typing.get_args(annotation) if c != default]
        flag_value = next(c for c in typing.get_args(annotation) if c != others[0])
        return str(others[0]), [flag, str(flag_value)], others[0], flag_value
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation)[0] is int:
        return "1,2,2,4", [flag, "1", "1", "2", "2", "4"], (1, 2, 2, 4), (1, 1, 2, 2, 4)
    if typing.get_origin(annotation) is tuple:
        return "0.1,0.2,0.3", [flag, "0.4", "0.5", "0.6"], (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    if typing.get_origin(annotation) is list:  # a repeatable flag; comma-separated in the environment
        (element,) = typing.get_args(annotation)
        return ("/tmp/a,/tmp/b", [flag, "/tmp/c", flag, "/tmp/d"], (element("/tmp/a"), element("/tmp/b")),
                (element("/tmp/c"), element("/tmp/d")))
    if annotation is int:
        base = 8000 if field.name == "port" else (default or 5)
        return str(base + 1), [flag, str(base + 2)], base + 1, base + 2
    if annotation is float:
        base = default or 0.0
        return str(base + 1.5), [flag, str(base + 2.5)], base + 1.5, base + 2.5
    if annotation is Path:
        return "/tmp/from-env", [flag, "/tmp/from-flag"], "/tmp/from-env", "/tmp/from-flag"
    return "from-env", [flag, "from-flag"], "from-env", "from-flag"


def _plain(value: Any) -> Any:
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _parsed(command: str, cls: type, argv: list[str]) -> Any:
    parser, _, positional = _commands()[command]
    args = parser().parse_args([*positional, *argv])
    if command == "serve":  # Settings reads its environment itself: the value is that of the built Settings
        from vqtok.service.settings import settings_from_args

        return settings_from_args(args)
    return args


COMMANDS = ["serve", "train", "evaluate", "encode", "decode", "import"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_names_its_environment_variable(command: str) -> None:
    parser_fn, configs, _ = _commands()[command]
    parser = parser_fn()
    expected = {f.name: f"{prefix}{f.name.upper()}" for cls, prefix in configs for f in config_fields(cls)}
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    text = parser.format_help()  # formats (a '%' in a help text would break it)
    for action in options:
        assert action.dest in expected, f"{command}: --{action.dest} comes from no config class"
        assert f"env {expected[action.dest]}" in (action.help or ""), (command, action.dest, action.help)
        assert expected[action.dest] in text.replace("\n", " ").replace("  ", "")


@pytest.mark.parametrize("command", COMMANDS)
def test_the_environment_sets_each_value_and_the_flag_beats_it(command: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    parser_fn, configs, _ = _commands()[command]
    dests = {a.dest for a in parser_fn()._actions if a.option_strings}
    checked = 0
    for cls, prefix in configs:
        for field in config_fields(cls):
            if field.name not in dests:  # train's in_channels: no flag
                continue
            env_text, flag_argv, from_env, from_flag = _two_values(field)
            env_name = f"{prefix}{field.name.upper()}"
            with monkeypatch.context() as patch:
                patch.setenv(env_name, env_text)
                assert _plain(getattr(_parsed(command, cls, []), field.name)) == from_env, (command, env_name)
                assert _plain(getattr(_parsed(command, cls, flag_argv), field.name)) == from_flag, (command, flag_argv)
            checked += 1
    assert checked >= 3


def test_a_bad_environment_value_is_refused_with_its_name(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vqtok.model.evaluate import build_parser

    monkeypatch.setenv("VQTOK_EVALUATE_SPLIT", "sideways")
    with pytest.raises(SystemExit):
        build_parser()
    assert "VQTOK_EVALUATE_SPLIT='sideways'" in capsys.readouterr().err


def test_a_pydantic_model_and_a_docstring_dataclass_make_the_same_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import BaseModel, Field

    @dataclasses.dataclass
    class AsDataclass:
        """Example.

        Attributes:
          size: how big,
            on two lines.
          fast: go fast.
        """

        size: int = 3
        fast: bool = False

    class AsModel(BaseModel):
        size: int = Field(3, description="how big, on two lines.")
        fast: bool = Field(False, description="go fast.")

    monkeypatch.setenv("EX_SIZE", "4")
    for cls in (AsDataclass, AsModel):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, cls, "EX_")
        helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
        assert helps == {"size": "how big, on two lines. [env EX_SIZE; default 3]",
                         "fast": "go fast. [env EX_FAST; default False]"}
        config = config_from_args(cls, parser.parse_args(["--fast"]))
        assert (config.size, config.fast) == (4, True)  # type: ignore[attr-defined]


def test_the_client_and_its_flags_stay_light() -> None:
    code = ("import sys; import vqtok.service.client as c; c.build_encode_parser(); c.build_decode_parser(); "
            "heavy = [m for m in ('torch', 'fastapi', 'starlette', 'uvicorn', 'pydantic_settings') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
