"""Checkpoints: a directory holding ``model.safetensors`` and ``config.json``.

``config.json`` carries the full ``VQVAEConfig``, the sha256 of the weights file and the ``model_id``
(a hash over the weights and every config field that changes tokens, see ``compute_model_id``), plus
whatever the trainer records (data, steps, wall time, metrics, codebook usage). Writes are atomic: the
new checkpoint is written into a temporary sibling directory and renamed into place, so a killed run
leaves either the old checkpoint or the new one, never half of one.

Loading refuses, with a ``CheckpointError`` naming the file and the problem, anything that would serve
wrong tokens or exhaust memory: a config value of the wrong type or beyond its bounds (checked before
any tensor is allocated), a ``weights_file`` that is not a plain file name, weights whose sha256 or
tensor names and shapes do not match, NaN or Inf in a tensor, and a recorded ``model_id`` that no
longer matches (``config.json`` edited after the checkpoint was written). ``verify_checkpoint`` runs
every one of these checks without building the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vqtok.model.config import VQVAEConfig
from vqtok.model.vqvae import VQVAE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default"
# Versions the model_id recipe: a different recipe must never produce an id equal to an old one.
MODEL_ID_FORMAT = "vqtok-model-id/1"
# Keys of config.json that save_checkpoint owns; metadata cannot override them.
_RESERVED_KEYS = ("format", "format_version", "config", "weights_file", "weights_sha256", "model_id")


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

    @property
    def model_id(self) -> str:
        """Hash over the weights and every config field that changes tokens (``compute_model_id``)."""
        return compute_model_id(self.config, self.weights_sha256)


def compute_model_id(config: VQVAEConfig, weights_sha256: str) -> str:
    """The model's identity: sha256 (hex) over the weights' sha256 and every token-changing config field.

    ``weights_sha256`` alone does not say which tokens a checkpoint produces: ``pixel_mean``, for one,
    lives in ``config.json`` and changes every token. The hashed fields are ``config.token_fields()``
    (architecture, codebook size, normalisation: ``TOKEN_FIELDS``), as canonical JSON (sorted keys, no
    spaces); training-only fields (``TRAINING_ONLY_FIELDS``: losses, EMA, restarts) cannot change an
    encode or decode output and are left out, so two configs with equal ids tokenize identically.
    """
    payload = {"format": MODEL_ID_FORMAT, "weights_sha256": weights_sha256, "config": config.token_fields()}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
        weights_sha256 = sha256_file(staging / WEIGHTS_FILE)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": weights_sha256,
            "model_id": compute_model_id(model.config, weights_sha256),
            **{k: v for k, v in (metadata or {}).items() if k not in _RESERVED_KEYS},
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


@dataclass(frozen=True)
class _Verified:
    """What the checks that need no tensor data established about a checkpoint directory."""

    path: Path
    record: dict[str, Any]
    config: VQVAEConfig
    config_path: Path
    weights_path: Path
    weights_sha256: str


def _weights_path(record: dict[str, Any], path: Path, config_path: Path) -> Path:
    """``path / weights_file``, refusing anything but a plain file name (no directories, ``..``, absolute)."""
    name = record.get("weights_file", WEIGHTS_FILE)
    plain = (
        isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
        and PurePosixPath(name).name == name and PureWindowsPath(name).name == name
    )
    if not plain:
        raise CheckpointError(
            f"{config_path}: weights_file {name!r} is not a plain file name; it must name a file inside "
            f"the checkpoint directory {path} (no directories, no '..', not an absolute path)"
        )
    return path / name


def _verify_files(directory: str | os.PathLike[str]) -> _Verified:
    """The record, the config (types and bounds, nothing allocated), the weights file name and its sha256."""
    path = Path(directory)
    record = read_checkpoint_record(path)
    config_path = path / CONFIG_FILE
    try:
        config = VQVAEConfig.from_dict(record["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid config: {exc}") from exc
    weights_path = _weights_path(record, path, config_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    actual_sha = sha256_file(weights_path)
    expected_sha = record.get("weights_sha256")
    if expected_sha != actual_sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {actual_sha} does not match {expected_sha} recorded in {config_path}; "
            "the weights file is corrupt or belongs to another checkpoint"
        )
    return _Verified(path, record, config, config_path, weights_path, actual_sha)


def _expected_tensors(config: VQVAEConfig) -> dict[str, torch.Tensor]:
    """The state dict ``VQVAE(config)`` has, as shape-and-dtype-only tensors on the meta device (no memory)."""
    with torch.device("meta"):
        return VQVAE(config).state_dict()


def _is_float_dtype(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"  # F16, F32, F64, F8_*, BF16


def _check_header(handle: Any, verified: _Verified, expected: dict[str, torch.Tensor]) -> None:
    """Tensor names, shapes and kinds (float or not) in the safetensors header against the config."""
    weights_path, config_path = verified.weights_path, verified.config_path
    present = set(handle.keys())
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not match the config in {config_path}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in expected.items():
        stored = handle.get_slice(key)
        shape = tuple(stored.get_shape())
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights_path}: tensor {key!r} has shape {shape}, "
                f"the config in {config_path} needs {tuple(tensor.shape)}"
            )
        if _is_float_dtype(stored.get_dtype()) != tensor.dtype.is_floating_point:
            raise CheckpointError(
                f"{weights_path}: tensor {key!r} has dtype {stored.get_dtype()}, the model needs {tensor.dtype}"
            )


def _check_model_id(verified: _Verified) -> None:
    """A recorded ``model_id`` must equal the one recomputed from the config and the weights."""
    recorded = verified.record.get("model_id")
    if recorded is None:  # written before model_id existed: nothing to compare, it is computed on load
        return
    computed = compute_model_id(verified.config, verified.weights_sha256)
    if recorded != computed:
        raise CheckpointError(
            f"{verified.config_path}: changed after the checkpoint was written: its model_id {recorded!r} no "
            f"longer matches {computed!r}, computed from the config and the weights (a field that changes "
            "tokens was edited); restore the original config.json or save the checkpoint again"
        )


def _check_finite(key: str, tensor: torch.Tensor, weights_path: Path) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{weights_path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}; "
            "the weights are corrupt (did training diverge?) and would map every image to the same code"
        )


def _read_tensors(verified: _Verified, keep: bool) -> dict[str, torch.Tensor]:
    """Check the weights file against the config and read every tensor, refusing NaN and Inf.

    Names and shapes are checked from the header, before any tensor data is read; tensors are read one
    at a time. Returns them when ``keep``, else an empty dict (only checking).
    """
    expected = _expected_tensors(verified.config)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(verified.weights_path), framework="pt", device="cpu") as handle:
            _check_header(handle, verified, expected)
            _check_model_id(verified)
            for key in expected:
                tensor = handle.get_tensor(key)
                _check_finite(key, tensor, verified.weights_path)
                if keep:
                    state[key] = tensor
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{verified.weights_path}: unreadable safetensors file ({exc})") from exc
    return state


def verify_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Run every check ``load_checkpoint`` runs, without building the model; ``CheckpointError`` if one fails.

    Checks, in order: the directory and ``config.json`` (valid JSON, format and version), the config
    (strict types, bounds and the parameter limit), ``weights_file`` (a plain file name), the weights'
    sha256, the safetensors header (readable; tensor names, shapes and kinds as the config needs), the
    recorded ``model_id``, and that no tensor holds NaN or Inf. Cheap: the weights file is read twice
    (hash, then one tensor at a time) and nothing the size of the model is allocated. For startup checks
    (``vqtok serve``) that must fail with one line before binding a port.
    """
    _read_tensors(_verify_files(directory), keep=False)


def load_checkpoint(
    directory: str | os.PathLike[str] = DEFAULT_CHECKPOINT,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint onto ``device`` and return the model in eval mode.

    Raises ``CheckpointError`` naming the file and the problem for: a missing directory or file,
    invalid JSON, an unknown, mistyped or out-of-bounds config value, a ``weights_file`` that is not a
    plain file name, a weights file whose sha256 differs from the recorded one, an unreadable weights
    file, missing, unexpected or mis-shaped tensors, a ``model_id`` that no longer matches the config
    (``config.json`` edited), and NaN or Inf in a tensor. Everything is checked before the model is built.
    """
    verified = _verify_files(directory)
    state = _read_tensors(verified, keep=True)
    model = VQVAE(verified.config)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    metadata = {k: v for k, v in verified.record.items() if k != "config"}
    return Checkpoint(model=model, config=verified.config, path=verified.path,
                      weights_sha256=verified.weights_sha256, metadata=metadata)
