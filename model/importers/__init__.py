"""Published tokenizer checkpoints -> vqtok checkpoints, without running any code from the files.

One module per source (:mod:`.llamagen`, :mod:`.taming`, :mod:`.chameleon`), the safe loader
(:mod:`.safe_load`), the config reader (:mod:`.config_file`), the shared architecture inference and strict
state-dict check (:mod:`.common`), and the ``vqtok import`` command (:mod:`.command`).
:func:`import_checkpoint` is the whole conversion as one call.
"""

from vqtok.model.importers.command import SOURCES, ImportConfig, import_checkpoint, main
from vqtok.model.importers.common import CONVERSION_VERSION, CheckpointImportError, ImportResult
from vqtok.model.importers.safe_load import UnsafeCheckpointError, load_untrusted

__all__ = [
    "CONVERSION_VERSION",
    "SOURCES",
    "CheckpointImportError",
    "ImportConfig",
    "ImportResult",
    "UnsafeCheckpointError",
    "import_checkpoint",
    "load_untrusted",
    "main",
]
