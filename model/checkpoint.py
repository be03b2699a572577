"""Checkpoints: a directory holding ``model.safetensors`` and ``config.json``.

``config.json`` carries the full ``VQVAEConfig`` and the sha256 of the weights file, plus whatever
the trainer records (data, steps, wall time, metrics, codebook usage). Writes are atomic: the new
checkpoint is written into a temporary sibling directory and renamed into place, so a killed run
leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqtok.model.config import VQVAEConfig
from vqtok.model.vqvae import VQVAE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on its device) and everything ``config.json`` says."""

    model: VQVAE
    config: VQVAEConfig
    path: Path
    weights_sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.path.name)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ``ValueError``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but torch sees no CUDA device")
    return torch.device(requested)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_checkpoint(directory: str | os.PathLike[str], model: VQVAE, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``metadata``) as a checkpoint directory, atomically. Returns the path."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unwrap DDP / torch.compile wrappers: the checkpoint holds the plain VQVAE's tensors.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            **(metadata or {}),
        }
        _write_json(staging / CONFIG_FILE, record)
        umask = _current_umask()
        for item in staging.iterdir():  # make the files durable before the rename publishes them
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(item, 0o666 & ~umask)  # temp files are private (0600); a checkpoint is for sharing
        os.chmod(staging, 0o777 & ~umask)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_checkpoint_record(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory, or ``CheckpointError``."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{config_path}: expected an object with a 'config' object")
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: 'format' is {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version {record.get('format_version')!r} is not supported "
            f"(this vqtok reads {FORMAT_VERSION})"
        )
    return record


def load_checkpoint(
    directory: str | os.PathLike[str] = DEFAULT_CHECKPOINT,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint onto ``device`` and return the model in eval mode.

    Raises ``CheckpointError`` naming the file and the problem for: a missing directory or file,
    invalid JSON, an unknown or invalid config key, a weights file whose sha256 differs from the
    recorded one, an unreadable weights file, and missing, unexpected or mis-shaped tensors.
    """
    path = Path(directory)
    record = read_checkpoint_record(path)
    config_path = path / CONFIG_FILE
    try:
        config = VQVAEConfig.from_dict(record["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid config: {exc}") from exc

    weights_path = path / str(record.get("weights_file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    actual_sha = sha256_file(weights_path)
    expected_sha = record.get("weights_sha256")
    if expected_sha != actual_sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {actual_sha} does not match {expected_sha} recorded in {config_path}; "
            "the weights file is corrupt or belongs to another checkpoint"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from exc

    model = VQVAE(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not match the config in {config_path}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights_path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"the config in {config_path} needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    metadata = {k: v for k, v in record.items() if k != "config"}
    return Checkpoint(model=model, config=config, path=path, weights_sha256=actual_sha, metadata=metadata)
