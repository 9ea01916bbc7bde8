"""torch.distributed.checkpoint (DCP) interoperability, both ways.

* ``Writer``: a DCP ``StorageWriter``. ``dcp.save(state_dict, storage_writer=Writer(url))``
  writes a ckpt checkpoint (safetensors data files, checksums, local disk or S3, the
  manifest as the single commit point) that ``ckpt.load`` and ``CheckpointManager`` read.
* ``Reader``: a DCP ``StorageReader``. ``dcp.load(state_dict, storage_reader=Reader(url))``
  reads a ckpt checkpoint (written by ``ckpt.save`` or by ``Writer``) into DCP's planner,
  resharded to the target's layout, every byte verified.
* ``import_dcp`` / ``export_dcp``: offline conversion of a DCP checkpoint directory to a
  ckpt checkpoint and back (the ``ckpt convert`` command).

``import ckpt`` does not import this package (nor torch.distributed.checkpoint); the
first use of ``ckpt.dcp`` does. docs/DCP.md says what maps to what, and the limits.
"""

from ckpt.dcp._convert import (
    DEFAULT_BATCH_BYTES,
    DcpImportResult,
    export_dcp,
    import_dcp,
    read_dcp_metadata,
)
from ckpt.dcp._reader import Reader
from ckpt.dcp._writer import Writer

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DcpImportResult",
    "Reader",
    "Writer",
    "export_dcp",
    "import_dcp",
    "read_dcp_metadata",
]
