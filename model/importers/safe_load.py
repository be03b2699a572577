"""Read published PyTorch / Lightning checkpoint files without running any code they carry.

``.pt`` and Lightning ``.ckpt`` files are pickles, and unpickling can call any importable function. So:

1. ``.safetensors`` files are read with safetensors (no pickle at all).
2. Every other file goes first to ``torch.load(weights_only=True)``: PyTorch's own restricted unpickler, which
   builds tensors and plain containers only.
3. Where that refuses (a Lightning checkpoint carries callback, optimizer and hyper-parameter objects keyed by
   their classes; LlamaGen's carries an ``argparse.Namespace``), :class:`RestrictedUnpickler` reads the zip
   archive itself. It rebuilds tensors from their storage records (bounds checked) and plain containers
   (``collections.OrderedDict``, sets), **refuses** any global from a module that can run code or touch the
   system (``os``, ``subprocess``, ``builtins.eval``, ...: :data:`REFUSED_MODULES`), and replaces every other
   unknown global by an inert stub (:class:`InertStub`): calling it, building it or filling it does nothing,
   so no code of the file runs. Stubs may sit anywhere *outside* the state dict (they stand for the training
   objects the import does not need); :func:`state_dict_from` refuses one *inside* it, naming the key.

``torch.load(weights_only=False)`` is never called.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import io
import math
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REFUSED_MODULES",
    "InertStub",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "load_untrusted",
    "state_dict_from",
]

#: Modules whose globals a checkpoint may never name: each can run code, import code or reach the system.
REFUSED_MODULES: frozenset[str] = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "importlib", "runpy", "socket", "shutil",
    "pty", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "types", "webbrowser", "multiprocessing",
    "asyncio", "signal", "platform", "tempfile", "io", "_io", "pathlib", "glob", "threading", "_thread",
    "functools", "operator", "inspect", "pdb", "timeit", "trace", "cProfile", "profile", "zipimport", "pkgutil",
    "torch.jit", "torch.ops", "torch._C", "torch.hub", "torch.serialization", "torch.utils.cpp_extension",
    "numpy.testing", "numpy.distutils", "numpy.f2py", "numpy.ctypeslib",
})
#: The ``builtins`` a pickle may name (plain containers and values; none that could allocate at will, such as
#: ``bytes(n)``); every other builtin is refused.
ALLOWED_BUILTINS: frozenset[str] = frozenset({"set", "frozenset", "slice", "complex"})

# Storage class names as torch.save writes them -> dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be read safely (or at all); the message names the file and the reason."""


class _StorageType:
    """What ``find_class`` returns for ``torch.FloatStorage`` and kin: just the dtype, nothing callable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class InertStub:
    """Stands for a class or function the file names but the import does not need. Does nothing, ever.

    Calling the stub (pickle's REDUCE / NEWOBJ) makes an empty instance; ``__setstate__``, ``append``, ``extend``
    and ``__setitem__`` (BUILD, APPENDS, SETITEMS) discard what they are given. ``stub_name`` says what it
    stands for (``module.name``).
    """

    stub_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertStub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert stub for {self.stub_name}>"


def _stub_class(module: str, name: str) -> type[InertStub]:
    return type(f"Stub[{module}.{name}]", (InertStub,), {"stub_name": f"{module}.{name}", "__module__": __name__})


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """Our own ``_rebuild_tensor_v2``: a strided view of a flat storage tensor, bounds checked, then copied."""
    if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
            and len(size) == len(stride) and offset >= 0):
        raise UnsafeCheckpointError(f"malformed tensor record (offset {offset!r}, size {size!r}, stride {stride!r})")
    if backward_hooks:
        raise UnsafeCheckpointError("a tensor in the file carries backward hooks (code); refused")
    if any(s == 0 for s in size):
        return torch.empty(size, dtype=storage.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if last >= storage.numel():
        raise UnsafeCheckpointError(f"a tensor record reaches past its storage ({last} >= {storage.numel()})")
    if math.prod(size) > storage.numel():  # only a zero stride could make more elements than the storage holds
        raise UnsafeCheckpointError(f"a tensor record of {math.prod(size)} elements views a storage of "
                                    f"{storage.numel()}; refused (it would allocate more than the file holds)")
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: the parameter's tensor (a plain tensor is all the import needs)."""
    if backward_hooks:
        raise UnsafeCheckpointError("a parameter in the file carries backward hooks (code); refused")
    if not isinstance(data, torch.Tensor):
        raise UnsafeCheckpointError(f"a parameter record holds {type(data).__name__}, not a tensor")
    return data


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    """``collections.OrderedDict`` as pickle calls it (no arguments, or one list of pairs)."""
    if len(args) > 1:
        raise UnsafeCheckpointError("malformed OrderedDict record")
    return OrderedDict(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("builtins", name): getattr(builtins, name) for name in ALLOWED_BUILTINS},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle the ``data.pkl`` of a ``torch.save`` zip archive, running none of its code.

    Args:
      data: the pickle bytes.
      archive: the open zip archive (its ``<prefix>/data/<key>`` entries hold the storages).
      prefix: the archive's top folder (``archive`` for files written by recent PyTorch).
      where: the file's name, for messages.

    ``stubs`` lists the ``module.name`` globals replaced by inert stubs.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix
        self.where = where
        self.storages: dict[str, torch.Tensor] = {}
        self.stubs: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2, as torch.save writes: "__builtin__ set") -> Python 3 names, as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        top = module.split(".")[0]
        refused = (module in REFUSED_MODULES or top in REFUSED_MODULES or module == "builtins"
                   or any(module.startswith(m + ".") for m in REFUSED_MODULES) or name.startswith("__"))
        if refused:
            raise UnsafeCheckpointError(
                f"{self.where}: refused: the file names {module}.{name}, which could run code; nothing of it "
                "was executed (vqtok reads tensors and plain containers only)"
            )
        self.stubs.add(f"{module}.{name}")
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """``('storage', storage type, key, location, numel)`` -> a flat tensor of that dtype (shared by key)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeCheckpointError(f"{self.where}: malformed storage record {pid!r}")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise UnsafeCheckpointError(f"{self.where}: storage {key!r} is missing from the archive") from None
            item = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) < numel * item:
                raise UnsafeCheckpointError(f"{self.where}: storage {key!r} is shorter than its record says")
            flat = torch.frombuffer(bytearray(raw[: numel * item]), dtype=storage_type.dtype) if numel else \
                torch.empty(0, dtype=storage_type.dtype)
            self.storages[key] = flat
        return self.storages[key]


def _restricted_load(path: Path) -> tuple[Any, set[str]]:
    """The object a ``torch.save`` zip archive holds, read by :class:`RestrictedUnpickler`; (object, stubs)."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path}: torch.load(weights_only=True) refused it and it is not a zip archive (the legacy torch.save "
            "format): vqtok cannot read its non-tensor objects safely; re-save the state dict alone "
            "(torch.save(model.state_dict(), ...)) or as safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeCheckpointError(f"{path}: not a torch.save archive (no single <folder>/data.pkl)")
        prefix = pickles[0].split("/")[0]
        byteorder = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() \
            else "little"
        if byteorder != "little":
            raise UnsafeCheckpointError(f"{path}: big-endian archives are not supported")
        unpickler = RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, str(path))
        try:
            obj = unpickler.load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # a malformed pickle: any error of the unpickler itself
            raise UnsafeCheckpointError(f"{path}: not a readable torch.save archive ({type(exc).__name__}: {exc})") \
                from None
    return obj, unpickler.stubs


def load_untrusted(path: str | Path) -> Any:
    """The object a checkpoint file holds, read without running code from it (see the module docstring).

    Returns a dict of tensors for ``.safetensors``; otherwise whatever the pickle holds, with tensors and plain
    containers rebuilt and unknown objects replaced by :class:`InertStub` instances or classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects the weights-only unpickler will not build: read the archive with ours
    except (RuntimeError, EOFError) as exc:
        raise UnsafeCheckpointError(f"{path}: not a PyTorch checkpoint ({exc})") from None
    obj, _ = _restricted_load(path)
    return obj


def state_dict_from(obj: Any, where: str, keys: tuple[str, ...] = ("state_dict", "model")
                    ) -> tuple[dict[str, torch.Tensor], str | None]:
    """(the tensors of the state dict inside a loaded checkpoint object, the key it sat under or None).

    ``obj`` is the state dict itself (every value a tensor) or a dict holding it under the first of ``keys``
    present (Lightning: ``state_dict``; LlamaGen: ``model``). Anything but a tensor inside the state dict (an
    inert stub above all) is refused, naming the key.
    """
    if not isinstance(obj, Mapping):
        raise UnsafeCheckpointError(f"{where}: expected a dict at the top of the file, got {type(obj).__name__}")
    chosen: Any = obj
    found_under: str | None = None
    for key in keys:
        if key in obj:
            chosen, found_under = obj[key], key
            break
    else:
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            found = ", ".join(sorted(str(k) for k in obj)[:12])
            raise UnsafeCheckpointError(
                f"{where}: no state dict found: the file is neither a dict of tensors nor has a "
                f"{' or '.join(repr(k) for k in keys)} entry (top-level keys: {found})"
            )
    if not isinstance(chosen, Mapping):
        raise UnsafeCheckpointError(f"{where}: the state dict is a {type(chosen).__name__}, not a dict")
    bad = [str(k) for k, v in chosen.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise UnsafeCheckpointError(
            f"{where}: the state dict holds non-tensor entries (refused, nothing of them runs): {', '.join(bad[:10])}"
        )
    return dict(chosen), found_under
