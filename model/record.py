"""The checkpoint record: what a checkpoint's ``config.json`` says, typed; read and written only here.

``CheckpointRecord.to_json`` writes, and ``CheckpointRecord.from_json`` reads, this layout
(``format_version`` 2), one JSON object::

  format             "vqtok-checkpoint"
  format_version     2
  model_id           sha256 over the weights' sha256 and the network config (``checkpoint.compute_model_id``)
  weights_file       the safetensors file's name inside the checkpoint directory (a plain file name)
  weights_sha256     sha256 (hex) of that file
  network            ``NetworkConfig``: what defines the network, all that serving needs
  codebook_training  ``CodebookTrainingConfig``: what only training reads
  provenance         ``Provenance``: name, created_at, steps, wall_time_s, resumed_from_step,
                     training (the ``TrainConfig``), data (description of the training data), hardware
  metrics            ``Metrics``: {"heldout_crops": the trainer's final held-out evaluation}
  codebook_usage     ``CodebookUsage`` or null: {"counts": K per-code counts, "perplexity", "codes_used"}
  imported_from      ``ImportedFrom`` or null (absent in older records): the source format, file and sha256 and
                     the conversion version of a checkpoint made by ``vqtok import``
  serving            ``ServingDefaults`` or null (absent in older records): native size, fit, default layout

Version 1 (every checkpoint written before version 2, the bundled one included until it was rewritten)
is flat: one ``config`` object holding both configs, and whatever the trainer recorded merged into the
top level (``name``, ``created_at``, ``steps``, ``wall_time_s``, ``resumed_from_step``, ``training``,
``data``, ``hardware``, ``metrics``, and ``codebook_usage`` as a bare list of counts). ``from_json``
reads both versions into the same record; other keys of a version-1 file were never read and are
dropped. ``to_json`` always writes version 2. Values are checked strictly, as JSON gives them: a
``RecordError`` (a ``ValueError``) names the key and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, ClassVar

import torch

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.quantizers import perplexity_of

FORMAT = "vqtok-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"


class RecordError(ValueError):
    """A record that cannot be read; the message names the key and the problem (not the file)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"'{where}' must be an object, got {value!r}")
    return value


def _no_unknown_keys(data: dict[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecordError(f"unknown key(s) in {where}: {', '.join(unknown)}")


@dataclass(frozen=True)
class Provenance:
    """How the model was made; every field None (or empty) when unknown.

    Attributes:
      name: the model's name (``vqtok train --name``); the checkpoint folder's name stands in when None.
      created_at: when the checkpoint was written, ISO 8601 in UTC.
      steps: optimizer steps taken.
      wall_time_s: seconds the run took (this process, since start or resume).
      resumed_from_step: the step a resumed run started from; None for a run started afresh.
      training: the ``TrainConfig`` as a JSON object (data spec, batch size, learning rate, ...).
      data: the training data's description (``model.data.describe``: an object), or a sentence.
      hardware: device, processes and torch version.
    """

    name: str | None = None
    created_at: str | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    resumed_from_step: int | None = None
    training: dict[str, Any] | None = None
    data: dict[str, Any] | str | None = None
    hardware: dict[str, Any] | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "name", "created_at", "steps", "wall_time_s", "resumed_from_step", "training", "data", "hardware",
    )

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS}

    @classmethod
    def from_json(cls, data: dict[str, Any], prefix: str) -> Provenance:
        """Read the ``KEYS`` of ``data`` (absent ones None); ``prefix`` names their place in messages."""
        def typed(key: str, check: Any, expected: str) -> Any:
            value = data.get(key)
            if value is not None and not check(value):
                raise RecordError(f"'{prefix}{key}' must be {expected} or null, got {value!r}")
            return value

        wall_time = typed("wall_time_s", _is_number, "a number")
        return cls(
            name=typed("name", lambda v: isinstance(v, str), "a string"),
            created_at=typed("created_at", lambda v: isinstance(v, str), "a string"),
            steps=typed("steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            wall_time_s=float(wall_time) if wall_time is not None else None,
            resumed_from_step=typed("resumed_from_step", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            training=typed("training", lambda v: isinstance(v, dict), "an object"),
            data=typed("data", lambda v: isinstance(v, dict | str), "an object or a string"),
            hardware=typed("hardware", lambda v: isinstance(v, dict), "an object"),
        )


@dataclass(frozen=True)
class Metrics:
    """Held-out metrics recorded with the checkpoint.

    Attributes:
      heldout_crops: the trainer's final evaluation on its held-out crops, as ``model.evaluate``
        reports it (``mse``, ``nmse``, ``psnr``, ``perplexity``, ``codes_used``, ``num_embeddings``,
        ``images``, ``data_variance``; plus ``ddp_codebook_max_abs_diff``); None when not evaluated.
    """

    heldout_crops: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {} if self.heldout_crops is None else {"heldout_crops": self.heldout_crops}

    @classmethod
    def from_json(cls, data: object, where: str = "metrics") -> Metrics:
        if data is None:
            return cls()
        data = _object(data, where)
        _no_unknown_keys(data, ("heldout_crops",), f"'{where}'")
        heldout = data.get("heldout_crops")
        if heldout is not None:
            heldout = _object(heldout, f"{where}.heldout_crops")
            bad = next((k for k, v in heldout.items() if not (_is_number(v) or v is None)), None)
            if bad is not None:
                raise RecordError(f"'{where}.heldout_crops.{bad}' must be a number, got {heldout[bad]!r}")
        return cls(heldout_crops=heldout)

    @property
    def heldout_perplexity(self) -> float | None:
        """The held-out evaluation's perplexity (exp(entropy) of its code distribution), if recorded and finite."""
        value = (self.heldout_crops or {}).get("perplexity")
        return float(value) if _is_number(value) and math.isfinite(value) else None

    @property
    def heldout_codes_used(self) -> int | None:
        """Distinct codes the held-out evaluation chose, if recorded."""
        value = (self.heldout_crops or {}).get("codes_used")
        return value if _is_int(value) else None


@dataclass(frozen=True)
class CodebookUsage:
    """How often each code was chosen: the counts of the trainer's final held-out evaluation.

    Attributes:
      counts: (K,) per-code counts, or None when only the summary is known.
      perplexity: exp(entropy) of ``counts / sum(counts)`` (K when every code is used equally).
      codes_used: codes with a non-zero count.
    """

    counts: tuple[int, ...] | None = None
    perplexity: float | None = None
    codes_used: int | None = None

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> CodebookUsage:
        """Counts -> the record, with perplexity (in float64) and codes used computed from them."""
        counts = tuple(int(c) for c in counts)
        total = sum(counts)
        perplexity = float(perplexity_of(torch.tensor(counts, dtype=torch.float64))) if total > 0 else None
        return cls(counts=counts, perplexity=perplexity, codes_used=sum(1 for c in counts if c > 0))

    def to_json(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "codes_used": self.codes_used,
                "counts": list(self.counts) if self.counts is not None else None}

    @classmethod
    def from_json(cls, data: object, num_embeddings: int, where: str = "codebook_usage") -> CodebookUsage | None:
        """A version-2 section (an object) or a version-1 bare list of counts; None for null.

        With counts, perplexity and codes used are recomputed from them (the stored figures are for
        people reading the file); the counts must be K non-negative integers.
        """
        if data is None:
            return None
        if isinstance(data, list):
            return cls._checked_counts(data, num_embeddings, where)
        data = _object(data, where)
        _no_unknown_keys(data, ("counts", "perplexity", "codes_used"), f"'{where}'")
        if data.get("counts") is not None:
            return cls._checked_counts(data["counts"], num_embeddings, f"{where}.counts")
        perplexity, codes_used = data.get("perplexity"), data.get("codes_used")
        if perplexity is not None and not (_is_number(perplexity) and math.isfinite(perplexity)):
            raise RecordError(f"'{where}.perplexity' must be a finite number or null, got {perplexity!r}")
        if codes_used is not None and not (_is_int(codes_used) and 0 <= codes_used <= num_embeddings):
            raise RecordError(f"'{where}.codes_used' must be an integer in [0, {num_embeddings}], got {codes_used!r}")
        return cls(perplexity=float(perplexity) if perplexity is not None else None, codes_used=codes_used)

    @classmethod
    def _checked_counts(cls, counts: object, num_embeddings: int, where: str) -> CodebookUsage:
        if not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
            raise RecordError(f"'{where}' must be a list of integers >= 0")
        if len(counts) != num_embeddings:
            raise RecordError(f"'{where}' has {len(counts)} entries, the network has {num_embeddings} codes")
        return cls.from_counts(counts)


#: How /encode fits an image to a size (``service.imaging.FitMode``; the record names one without importing it).
FIT_MODES: tuple[str, ...] = ("pad", "crop", "resize", "none")


@dataclass(frozen=True)
class ImportedFrom:
    """Where an imported checkpoint (``vqtok import``) came from; the record's ``imported_from`` section.

    Attributes:
      source_format: the published format read: "llamagen", "taming" or "chameleon".
      weights_file: the source weights file's name (no directories).
      weights_sha256: sha256 (hex) of that file.
      config_file: the source config file's name, if one was given.
      config_sha256: sha256 (hex) of that config file, if one was given.
      conversion_version: the version of the conversion (``model.importers.CONVERSION_VERSION``).
      state_dict_key: where the state dict sat in the file ("state_dict", "model", a key prefix, or None for
        a file that is the state dict itself).
    """

    source_format: str
    weights_file: str
    weights_sha256: str
    conversion_version: int
    config_file: str | None = None
    config_sha256: str | None = None
    state_dict_key: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "source_format", "weights_file", "weights_sha256", "conversion_version", "config_file", "config_sha256",
        "state_dict_key",
    )

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS}

    @classmethod
    def from_json(cls, data: object, where: str = "imported_from") -> ImportedFrom | None:
        if data is None:
            return None
        data = _object(data, where)
        _no_unknown_keys(data, cls.KEYS, f"'{where}'")
        for key in ("source_format", "weights_file", "weights_sha256"):
            if not isinstance(data.get(key), str):
                raise RecordError(f"'{where}.{key}' must be a string, got {data.get(key)!r}")
        for key in ("config_file", "config_sha256", "state_dict_key"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise RecordError(f"'{where}.{key}' must be a string or null, got {data[key]!r}")
        if not (_is_int(data.get("conversion_version")) and data["conversion_version"] >= 1):
            raise RecordError(f"'{where}.conversion_version' must be an integer >= 1, got "
                              f"{data.get('conversion_version')!r}")
        return cls(**{key: data.get(key) for key in cls.KEYS})


@dataclass(frozen=True)
class ServingDefaults:
    """How the model expects to be served; the record's ``serving`` section (each field None when unset).

    The service reads it last: a request's ``size`` / ``fit`` / ``layout`` beats the service settings
    (``default_size``, ``layout``), which beat these.

    Attributes:
      size: the native side in pixels (the model was trained on ``size`` x ``size`` images; LlamaGen 256,
        Chameleon 512); ``/encode`` without a size (and no ``default_size``) fits images to it.
      fit: how ``/encode`` fits an image to ``size`` when the request names no fit: one of ``FIT_MODES``
        (LlamaGen and Chameleon resize the short side and centre-crop: "crop").
      layout: the default token layout (a preset name of ``model.layouts``, e.g. "chameleon-like").
    """

    size: int | None = None
    fit: str | None = None
    layout: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("size", "fit", "layout")

    def __post_init__(self) -> None:
        if self.size is not None and not (_is_int(self.size) and 1 <= self.size <= 65536):
            raise RecordError(f"'serving.size' must be an integer in [1, 65536] or null, got {self.size!r}")
        if self.fit is not None and self.fit not in FIT_MODES:
            raise RecordError(f"'serving.fit' must be one of {', '.join(FIT_MODES)} or null, got {self.fit!r}")
        if self.layout is not None and not (isinstance(self.layout, str) and self.layout):
            raise RecordError(f"'serving.layout' must be a non-empty string or null, got {self.layout!r}")

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS}

    @classmethod
    def from_json(cls, data: object, where: str = "serving") -> ServingDefaults | None:
        if data is None:
            return None
        data = _object(data, where)
        _no_unknown_keys(data, cls.KEYS, f"'{where}'")
        return cls(**{key: data.get(key) for key in cls.KEYS})


def _check_weights_file(name: object) -> str:
    """``name`` if it is a plain file name (no directories, ``..``, absolute path or NUL), else ``RecordError``."""
    plain = (
        isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
        and PurePosixPath(name).name == name and PureWindowsPath(name).name == name
    )
    if not plain:
        raise RecordError(
            f"weights_file {name!r} is not a plain file name; it must name a file inside the checkpoint "
            "directory (no directories, no '..', not an absolute path)"
        )
    assert isinstance(name, str)
    return name


def _configs(network: object, codebook_training: object) -> tuple[NetworkConfig, CodebookTrainingConfig]:
    """Both configs from their JSON objects; type and range errors become ``RecordError('invalid config: ...')``."""
    try:
        built_network = NetworkConfig.from_dict(_object(network, "network"))
        built_training = CodebookTrainingConfig.from_dict(_object(codebook_training, "codebook_training"))
        built_training.check_network(built_network)
    except RecordError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecordError(f"invalid config: {exc}") from exc
    return built_network, built_training


def _split_version_1_config(config: dict[str, Any]) -> tuple[NetworkConfig, CodebookTrainingConfig]:
    """A version-1 flat ``config`` object -> both configs (an unknown key is refused, as before)."""
    network_keys = set(NetworkConfig.__dataclass_fields__)
    training_keys = set(CodebookTrainingConfig.__dataclass_fields__)
    unknown = sorted(set(config) - network_keys - training_keys)
    if unknown:
        raise RecordError(f"invalid config: unknown config key(s): {', '.join(unknown)}")
    return _configs({k: v for k, v in config.items() if k in network_keys},
                    {k: v for k, v in config.items() if k in training_keys})


@dataclass(frozen=True)
class CheckpointRecord:
    """Everything a checkpoint's ``config.json`` says (see the module docstring for the JSON layout).

    Attributes:
      network: what defines the network; ``model_id`` hashes it with the weights.
      codebook_training: what only training reads.
      weights_sha256: sha256 (hex) of the weights file.
      weights_file: the weights file's name inside the checkpoint directory.
      model_id: the recorded identity; None in records older than it (it is then computed on load).
      provenance: how the model was made.
      metrics: held-out metrics.
      codebook_usage: per-code usage counts and their perplexity and codes used; None if not recorded.
      imported_from: where an imported checkpoint came from (``vqtok import``); None for vqtok's own.
      serving: the native size, fit and default layout the service falls back to; None when not recorded.
      format_version: the layout the record was read from (``FORMAT_VERSION`` for a new one);
        ``to_json`` always writes ``FORMAT_VERSION``.
    """

    network: NetworkConfig
    codebook_training: CodebookTrainingConfig
    weights_sha256: str
    weights_file: str = WEIGHTS_FILE
    model_id: str | None = None
    provenance: Provenance = field(default_factory=Provenance)
    metrics: Metrics = field(default_factory=Metrics)
    codebook_usage: CodebookUsage | None = None
    imported_from: ImportedFrom | None = None
    serving: ServingDefaults | None = None
    format_version: int = FORMAT_VERSION

    format: ClassVar[str] = FORMAT
    KEYS: ClassVar[tuple[str, ...]] = (
        "format", "format_version", "model_id", "weights_file", "weights_sha256", "network", "codebook_training",
        "provenance", "metrics", "codebook_usage", "imported_from", "serving",
    )

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object ``config.json`` holds, in the current layout (``FORMAT_VERSION``)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "network": self.network.to_dict(),
            "codebook_training": self.codebook_training.to_dict(),
            "provenance": self.provenance.to_json(),
            "metrics": self.metrics.to_json(),
            "codebook_usage": self.codebook_usage.to_json() if self.codebook_usage is not None else None,
            "imported_from": self.imported_from.to_json() if self.imported_from is not None else None,
            "serving": self.serving.to_json() if self.serving is not None else None,
        }

    @classmethod
    def from_json(cls, data: object) -> CheckpointRecord:
        """Read a record of any readable version (``READABLE_VERSIONS``); ``RecordError`` names what is wrong.

        Checks, in order: a JSON object, ``format``, ``format_version``, the configs (strict types,
        bounds and the parameter limit: nothing is allocated), ``weights_file`` (a plain file name),
        ``weights_sha256`` and ``model_id`` (strings), then the provenance, metrics and usage sections.
        """
        if not isinstance(data, dict):
            raise RecordError("expected a JSON object")
        if data.get("format") != FORMAT:
            raise RecordError(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("format_version")
        if not (_is_int(version) and version in READABLE_VERSIONS):
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise RecordError(f"format_version {version!r} is not supported (this vqtok reads {readable})")
        if version == 1:  # flat: one config object, the trainer's metadata in the top level
            if not isinstance(data.get("config"), dict):
                raise RecordError("expected an object with a 'config' object")
            network, codebook_training = _split_version_1_config(data["config"])
            sections: dict[str, Any] = data
        else:
            _no_unknown_keys(data, cls.KEYS, "the record")
            network, codebook_training = _configs(data.get("network"), data.get("codebook_training"))
            sections = _object(data.get("provenance", {}), "provenance")
            _no_unknown_keys(sections, Provenance.KEYS, "'provenance'")
        weights_file = _check_weights_file(data.get("weights_file", WEIGHTS_FILE))
        weights_sha256, model_id = data.get("weights_sha256"), data.get("model_id")
        if not isinstance(weights_sha256, str):
            raise RecordError(f"'weights_sha256' must be a string (the weights file's sha256), got {weights_sha256!r}")
        if model_id is not None and not isinstance(model_id, str):
            raise RecordError(f"'model_id' must be a string or absent, got {model_id!r}")
        provenance = Provenance.from_json(sections, prefix="" if version == 1 else "provenance.")
        metrics = Metrics.from_json(data.get("metrics") or None)  # version 1 wrote {} when nothing was evaluated
        usage = data.get("codebook_usage")
        return cls(
            network=network, codebook_training=codebook_training, weights_sha256=weights_sha256,
            weights_file=weights_file, model_id=model_id, provenance=provenance, metrics=metrics,
            codebook_usage=CodebookUsage.from_json(usage, network.num_embeddings),
            imported_from=ImportedFrom.from_json(data.get("imported_from") if version != 1 else None),
            serving=ServingDefaults.from_json(data.get("serving") if version != 1 else None),
            format_version=version,
        )
