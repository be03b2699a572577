"""Checkpoints: a directory holding ``model.safetensors`` and ``config.json``.

``config.json`` holds the checkpoint's record (``model.record.CheckpointRecord``, read and written
only there): the network config, the codebook-training config, the sha256 of the weights file, the
``model_id`` (a hash over the weights and the network config, see ``compute_model_id``), and how the
model was made (provenance, held-out metrics, codebook usage). Writes are atomic: the new checkpoint
is written into a temporary sibling directory and renamed into place, so a killed run leaves either
the old checkpoint or the new one, never half of one.

Loading refuses, with a ``CheckpointError`` naming the file and the problem, anything that would serve
wrong tokens or exhaust memory: a record of an unknown format or version, a config value of the wrong
type or beyond its bounds (checked before any tensor is allocated), a ``weights_file`` that is not a
plain file name, weights whose sha256 or tensor names and shapes do not match, NaN or Inf in a tensor,
and a recorded ``model_id`` that no longer matches (``config.json`` edited after the checkpoint was
written). ``verify_checkpoint`` runs every one of these checks without building the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.record import (
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    CheckpointRecord,
    CodebookUsage,
    ImportedFrom,
    Metrics,
    Provenance,
    RecordError,
    ServingDefaults,
)
from vqtok.model.vqvae import VQVAE
from vqtok.model.weights import resolve_checkpoint

__all__ = [
    "CONFIG_FILE", "DEFAULT_CHECKPOINT", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "Checkpoint", "CheckpointError",
    "CheckpointRecord", "CodebookUsage", "ImportedFrom", "Metrics", "Provenance", "ServingDefaults",
    "compute_model_id", "load_checkpoint", "pick_device", "read_checkpoint_record", "save_checkpoint", "sha256_file",
    "verify_checkpoint",
]

CONFIG_FILE = "config.json"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default"
# Versions the model_id recipe: a different recipe must never produce an id equal to an old one.
MODEL_ID_FORMAT = "vqtok-model-id/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on its device), its directory and its record."""

    model: VQVAE
    record: CheckpointRecord
    path: Path

    @property
    def network(self) -> NetworkConfig:
        """What defines the network (all that serving needs)."""
        return self.record.network

    @property
    def codebook_training(self) -> CodebookTrainingConfig:
        """How the codebook was trained (read by training only)."""
        return self.record.codebook_training

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file (checked against the file on load)."""
        return self.record.weights_sha256

    @property
    def name(self) -> str:
        """The recorded name, else the checkpoint folder's name."""
        return self.record.provenance.name or self.path.name

    @property
    def model_id(self) -> str:
        """Hash over the weights and the network config (``compute_model_id``)."""
        return compute_model_id(self.network, self.weights_sha256)


def compute_model_id(network: NetworkConfig, weights_sha256: str) -> str:
    """The model's identity: sha256 (hex) over the weights' sha256 and the network config.

    ``weights_sha256`` alone does not say which tokens a checkpoint produces: ``pixel_mean``, for one,
    lives in ``config.json`` and changes every token. Every ``NetworkConfig`` field (architecture,
    codebook size, quantizer kind, normalisation) can change a token, and all are hashed, as canonical
    JSON (sorted keys, no spaces); ``CodebookTrainingConfig`` (losses, EMA, restarts) cannot change an
    encode or decode output and is left out, so two checkpoints with equal ids tokenize identically.
    The recipe (``MODEL_ID_FORMAT``) is the one version-1 records were written with: ids are unchanged
    (fields added since are hashed only when they differ from their defaults, ``NetworkConfig.identity_dict``).
    """
    payload = {"format": MODEL_ID_FORMAT, "weights_sha256": weights_sha256, "config": network.identity_dict()}
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


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: VQVAE,
    provenance: Provenance | None = None,
    metrics: Metrics | None = None,
    codebook_usage: CodebookUsage | None = None,
    imported_from: ImportedFrom | None = None,
    serving: ServingDefaults | None = None,
) -> Path:
    """Write ``model`` and its record as a checkpoint directory, atomically. Returns the path.

    The record's configs come from the model, its ``weights_sha256`` and ``model_id`` are computed
    here (no caller can set them); ``provenance``, ``metrics`` and ``codebook_usage`` say how the model
    was made, ``imported_from`` where an imported one came from, ``serving`` its native size, fit and layout.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unwrap DDP / torch.compile wrappers: the checkpoint holds the plain VQVAE's tensors.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        weights_sha256 = sha256_file(staging / WEIGHTS_FILE)
        record = CheckpointRecord(
            network=model.network,
            codebook_training=model.codebook_training,
            weights_sha256=weights_sha256,
            weights_file=WEIGHTS_FILE,
            model_id=compute_model_id(model.network, weights_sha256),
            provenance=provenance or Provenance(),
            metrics=metrics or Metrics(),
            codebook_usage=codebook_usage,
            imported_from=imported_from,
            serving=serving,
        )
        _write_json(staging / CONFIG_FILE, record.to_json())
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


def read_checkpoint_record(directory: str | os.PathLike[str]) -> CheckpointRecord:
    """The record in a checkpoint directory's ``config.json`` (any readable version), or ``CheckpointError``.

    Reading checks the format and version, the configs (strict types, bounds and the parameter limit:
    nothing is allocated), the ``weights_file`` name and the metadata's types; not the weights.
    ``directory`` may be the name of a bundled checkpoint (``default``: ``model.weights``).
    """
    path = resolve_checkpoint(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    try:
        return CheckpointRecord.from_json(data)
    except RecordError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc


@dataclass(frozen=True)
class _Verified:
    """What the checks that need no tensor data established about a checkpoint directory."""

    path: Path
    record: CheckpointRecord
    config_path: Path
    weights_path: Path


def _verify_files(directory: str | os.PathLike[str]) -> _Verified:
    """The record (configs checked, nothing allocated), the weights file and its sha256."""
    path = resolve_checkpoint(directory)
    record = read_checkpoint_record(path)
    config_path = path / CONFIG_FILE
    weights_path = path / record.weights_file
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    actual_sha = sha256_file(weights_path)
    if record.weights_sha256 != actual_sha:
        raise CheckpointError(
            f"{weights_path}: sha256 {actual_sha} does not match {record.weights_sha256} recorded in {config_path}; "
            "the weights file is corrupt or belongs to another checkpoint"
        )
    return _Verified(path, record, config_path, weights_path)


def _expected_tensors(record: CheckpointRecord) -> dict[str, torch.Tensor]:
    """The state dict the record's VQVAE has, as shape-and-dtype-only tensors on the meta device (no memory)."""
    with torch.device("meta"):
        return VQVAE(record.network, record.codebook_training).state_dict()


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
    recorded = verified.record.model_id
    if recorded is None:  # written before model_id existed: nothing to compare, it is computed on load
        return
    computed = compute_model_id(verified.record.network, verified.record.weights_sha256)
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
    expected = _expected_tensors(verified.record)
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
    model = VQVAE(verified.record.network, verified.record.codebook_training)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return Checkpoint(model=model, record=verified.record, path=verified.path)
