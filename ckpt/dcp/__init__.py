"""torch.distributed.checkpoint (DCP) interoperability, both ways.

* ``Writer``: a DCP ``StorageWriter``. ``dcp.save(state_dict, storage_writer=Writer(url))``
  writes a ckpt checkpoint (safetensors data files, checksums, local disk or S3, the
  manifest as the single commit point) that ``ckpt.load`` and ``CheckpointManager`` read.
* ``Reader``: a DCP ``StorageReader``. ``dcp.load(state_dict, storage_reader=Reader(url))``
  reads a ckpt checkpoint (written by ``ckpt.save`` or by ``Writer``) into DCP's planner,
  resharded to the target's layout, every byte verified.

docs/DCP.md says what maps to what, and the limits.
"""

from ckpt.dcp._reader import Reader
from ckpt.dcp._writer import Writer

__all__ = ["Reader", "Writer"]
