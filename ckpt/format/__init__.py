"""A reader of ckpt's open on-storage format (versions 1 and 2), for ckpt and any other tool.

docs/FORMAT.md is the contract; this package is its one implementation. What it offers:

* the schema: ``Manifest`` (the commit point of a step), ``TensorEntry`` (a global tensor),
  ``StoredPiece`` (a region of it in a data file), ``FileHeader`` (a raw data file's
  safetensors header), ``ShardIndex`` (one rank's report, and in v2 its index file),
  ``WriterRef`` (a v2 manifest's pin of an index file), ``PlanRecord`` (in v2, the write
  plan a save was made with), ``Layout`` (in v2, which writer
  holds which region of a tensor; ``infer_layout`` makes one), each
  with ``from_bytes`` (validated; ``CorruptCheckpointError`` / ``UnsupportedFormatError``
  naming the file and field) and ``to_bytes``; ``RankTiming`` (a rank's phase times, in
  its report) and ``SaveTimings`` (every rank's, in the manifest);
* the layout of a root: ``scan_steps``, ``read_manifest``, ``load_pieces`` (a v2
  manifest's pieces, from only the index files a reader needs), ``step_prefix``,
  ``parse_step_prefix``, ``manifest_path`` and the folder names;
* geometry: ``Box`` (a region of a global tensor), ``row_span`` and ``first_overlap``;
* element types: ``dtype_name``, ``torch_dtype``, ``element_size``, ``safetensors_header``
  and ``check_safetensors_header``;
* the state tree: its markers (``TENSOR_REF`` ...) and ``check_state_markers``;
* host memory for CUDA copies: ``page_lock`` and ``page_unlock`` (exact-size page-locked
  buffers, shared by the save's staging and the load's read buffers);
* stored chunks: ``checksum``, ``chunk_checksums``, ``split_digests``, ``stored_chunk_bounds``,
  ``compress_chunks``, ``decompress_chunk`` and the manifest's own seal.

Example::

    from storage_backends import open_backend
    from ckpt.format import read_manifest, scan_steps

    backend = open_backend("/nvme/run1")
    newest = scan_steps(backend).committed[-1]
    for name, tensor in read_manifest(backend, newest).tensors.items():
        print(name, tensor.dtype, tensor.shape, len(tensor.pieces))
"""

from ckpt.format._codec import (
    CHECKSUM_ALGORITHM,
    CODECS,
    DIGEST_HEX,
    ZSTD_MAX_RATIO,
    checksum,
    chunk_checksums,
    chunk_count,
    compress_chunks,
    decompress_chunk,
    split_digests,
    stored_chunk_bounds,
)
from ckpt.format._dtypes import (
    DTYPES,
    MAX_SAFETENSORS_HEADER,
    SAFETENSORS_METADATA,
    check_safetensors_header,
    dtype_name,
    element_size,
    safetensors_header,
    torch_dtype,
)
from ckpt.format._geometry import Box, first_overlap, row_span
from ckpt.format._layout import Layout, grid_layout, infer_layout
from ckpt.format._paths import (
    DATA_DIR,
    DEFAULT_CHUNK_BYTES,
    INDEX_DIR,
    MANIFEST_NAME,
    manifest_path,
    parse_step_prefix,
    safe_relative_path,
    step_prefix,
)
from ckpt.format._pinned import page_lock, page_unlock
from ckpt.format._reader import StepListing, read_manifest, scan_steps
from ckpt.format._schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_TREE_DEPTH,
    FileHeader,
    Manifest,
    PlanRecord,
    RankTiming,
    SaveTimings,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
)
from ckpt.format._seal import seal_digest, seal_manifest, verify_manifest_seal
from ckpt.format._tree import (
    BYTES_REF,
    DTYPE_REF,
    ITEMS_REF,
    NDARRAY_REF,
    STATE_MARKERS,
    TENSOR_REF,
    TUPLE_REF,
    check_state_markers,
    merge_trees,
    tree_shape_digest,
)
from ckpt.format._writers import load_pieces, writers_needed

__all__ = [
    "BYTES_REF",
    "DTYPE_REF",
    "ITEMS_REF",
    "NDARRAY_REF",
    "STATE_MARKERS",
    "TENSOR_REF",
    "TUPLE_REF",
    "check_state_markers",
    "merge_trees",
    "tree_shape_digest",
    "CHECKSUM_ALGORITHM",
    "CODECS",
    "DATA_DIR",
    "DEFAULT_CHUNK_BYTES",
    "DIGEST_HEX",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_DIR",
    "MANIFEST_NAME",
    "MAX_SAFETENSORS_HEADER",
    "MAX_TREE_DEPTH",
    "SAFETENSORS_METADATA",
    "ZSTD_MAX_RATIO",
    "Box",
    "Layout",
    "WriterRef",
    "grid_layout",
    "infer_layout",
    "page_lock",
    "page_unlock",
    "load_pieces",
    "seal_digest",
    "writers_needed",
    "FileHeader",
    "Manifest",
    "PlanRecord",
    "RankTiming",
    "SaveTimings",
    "ShardIndex",
    "StepListing",
    "StoredPiece",
    "TensorEntry",
    "check_safetensors_header",
    "checksum",
    "chunk_checksums",
    "chunk_count",
    "compress_chunks",
    "decompress_chunk",
    "dtype_name",
    "element_size",
    "first_overlap",
    "manifest_path",
    "parse_step_prefix",
    "read_manifest",
    "row_span",
    "safe_relative_path",
    "safetensors_header",
    "scan_steps",
    "seal_manifest",
    "split_digests",
    "step_prefix",
    "stored_chunk_bounds",
    "torch_dtype",
    "verify_manifest_seal",
]
