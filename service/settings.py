"""Every knob of the service: one pydantic-settings class, read from ``VQTOK_*`` environment variables.

The ``vqtok serve`` flags are generated from the same fields by the shared generator of every command
(``vqtok.model.options.add_config_arguments``, wrapped here as ``add_settings_arguments``), so a flag,
its environment variable and its default can never drift apart: ``--max-batch-size`` is
``VQTOK_MAX_BATCH_SIZE`` is ``Settings.max_batch_size``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vqtok.model.checkpoint import DEFAULT_CHECKPOINT
from vqtok.model.options import add_config_arguments, config_from_args

DeviceChoice = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def _port_from_environment() -> int:
    """Container platforms set a plain ``PORT``; ``VQTOK_PORT`` (read by pydantic-settings) wins over it."""
    raw = os.environ.get("PORT", "").strip()
    if not raw:
        return 8000
    if not raw.isdigit():
        raise ValueError(f"PORT must be an integer, got {raw!r}")
    return int(raw)


class Settings(BaseSettings):
    """Service configuration. Each field is the environment variable ``VQTOK_<FIELD NAME IN CAPITALS>``."""

    model_config = SettingsConfigDict(env_prefix="VQTOK_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(
        default_factory=_port_from_environment, ge=0, le=65535,
        description="TCP port (falls back to $PORT when VQTOK_PORT is unset, else 8000)",
    )
    checkpoint: Path = Field(
        DEFAULT_CHECKPOINT,
        description="checkpoint directory (model.safetensors + config.json), or a bundled model's name "
                    "(default: the seed's f=4 model with 512 codes)",
    )
    device: DeviceChoice = Field("auto", description="auto picks cuda when available, else cpu")
    api_key: SecretStr | None = Field(
        None, description="when set, every endpoint but /health, /ready and /metrics needs 'Authorization: Bearer KEY'"
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="images or grids per forward pass")
    max_wait_ms: float = Field(
        0.0, ge=0.0, le=1000.0, description="how long an idle model waits for company before a batch that is not "
        "full (0: continuous batching, run at once; requests that arrive during a batch form the next one)"
    )
    max_batch_pixels: int = Field(
        1_048_576, ge=1, description="pixels per forward pass (the images an encode reads or a decode writes; "
        "16 x 256x256 by default): small images batch wide, large ones narrow; a larger item runs alone"
    )
    max_queue_depth: int = Field(
        256, ge=1, description="images/grids waiting for the model; past it requests fail fast with 429"
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body limit, counted while reading")
    max_pixels: int = Field(
        40_000_000, ge=1, description="pixels per uploaded image, checked from the header before decoding"
    )
    max_images_per_request: int = Field(64, ge=1, description="images per /encode, grids per /decode")
    max_tokens_per_grid: int = Field(
        65_536, ge=1, description="h*w of one token grid, for /encode results and /decode inputs alike"
    )
    default_size: str | None = Field(
        None, description="target size ('N' or 'WxH') for /encode requests that give none; "
        "unset keeps each image's size"
    )
    max_tokens_per_request: int = Field(
        262_144, ge=1, description="tokens of all grids of one /encode answer or one /decode request "
        "(at least max_tokens_per_grid), checked before any image or grid is decoded"
    )
    max_decode_pixels: int = Field(
        80_000_000, ge=1, description="pixels of uploaded images being decoded at once, all requests together "
        "(at least max_pixels); an image waits for room, at most decode_wait_s"
    )
    decode_wait_s: float = Field(
        5.0, ge=0.0, le=600.0, description="how long an image waits for max_decode_pixels to have room; "
        "past it 429 with Retry-After"
    )
    max_concurrent_requests: int = Field(
        64, ge=1, description="requests being read, parsed or computed at once; past it /encode and /decode "
        "answer 429 before reading the body"
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="time to receive a whole request body; past it 408 and the "
        "connection closes"
    )
    request_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="deadline for a request's queued work; past it 504"
    )
    drain_timeout_s: float = Field(
        20.0, ge=0.0, le=3600.0, description="on SIGTERM, how long queued and running requests may finish; "
        "what is left then gets 503"
    )
    warmup: bool = Field(True, description="run the largest batch a request can form at warmup_size (max_batch_size "
                         "images, fewer when max_batch_pixels binds) through encode and decode at startup")
    warmup_size: int = Field(256, ge=16, le=4096, description="side of the warm-up images")
    log_level: LogLevel = Field("info", description="logging level of the service and uvicorn")
    layout: str = Field(
        "flat", min_length=1, description="default token layout of /encode tokens and /decode: a preset "
        "(flat, chameleon-like, emu3-like, lumina-like) or the name of a layout from layout_files"
    )
    layout_files: Annotated[list[Path] | None, NoDecode] = Field(
        None, description="layout JSON files to load (repeat the flag; in the environment, paths separated "
        "by commas or a JSON list); a file's layout replaces a preset of the same name"
    )

    @field_validator("layout_files", mode="before")
    @classmethod
    def _split_layout_files(cls, value: Any) -> Any:
        """``VQTOK_LAYOUT_FILES``: ``a.json,b.json`` or ``["a.json", "b.json"]``; empty means none."""
        if isinstance(value, str):
            import json

            text = value.strip()
            if not text:
                return None
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError(
                "api_key is set but empty: unset VQTOK_API_KEY to run without a key, or give a non-empty key"
            )
        if self.max_images_per_request > self.max_queue_depth:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must not exceed max_queue_depth "
                f"({self.max_queue_depth}): such a request could never be queued"
            )
        if self.max_tokens_per_request < self.max_tokens_per_grid:
            raise ValueError(
                f"max_tokens_per_request ({self.max_tokens_per_request}) must be at least max_tokens_per_grid "
                f"({self.max_tokens_per_grid}): a grid the per-grid limit allows could never be sent"
            )
        if self.max_decode_pixels < self.max_pixels:
            raise ValueError(
                f"max_decode_pixels ({self.max_decode_pixels}) must be at least max_pixels ({self.max_pixels}): "
                "an image the per-image limit allows could never be decoded"
            )
        if self.default_size is not None:
            from vqtok.service.errors import ServiceError
            from vqtok.service.imaging import parse_size  # local: imaging imports numpy/PIL, settings stays light

            try:
                default = parse_size(self.default_size)
            except ServiceError as exc:
                raise ValueError(f"default_size: {exc.message}") from exc
            if default.pixels > self.max_pixels:
                raise ValueError(
                    f"default_size {default} = {default.pixels} pixels is over max_pixels ({self.max_pixels})"
                )
        return self

    def limits(self) -> dict[str, Any]:
        """The request limits and batching knobs, as /info publishes them."""
        names = (
            "max_batch_size", "max_wait_ms", "max_batch_pixels", "max_queue_depth", "max_body_bytes", "max_pixels",
            "max_images_per_request", "max_tokens_per_grid", "default_size", "max_tokens_per_request",
            "max_decode_pixels", "decode_wait_s", "max_concurrent_requests",
            "body_timeout_s", "request_timeout_s", "drain_timeout_s",
        )
        return {name: getattr(self, name) for name in names}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``Settings`` field (the shared generator); unset flags stay absent so the
    ``VQTOK_*`` environment variables, read by ``Settings`` itself, still apply."""
    add_config_arguments(parser, Settings, title="service settings (env VQTOK_*)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the environment, overridden by the flags given on the command line."""
    return config_from_args(Settings, args)
