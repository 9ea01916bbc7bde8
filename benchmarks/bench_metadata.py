"""Metadata at scale: format v1's and v2's metadata for FSDP2-sized jobs, without data bytes.

    .venv/bin/python -m benchmarks.bench_metadata                  # 1024 and 4096 ranks, llama-7B
    .venv/bin/python -m benchmarks.bench_metadata --quick          # 256 ranks, under a minute
    .venv/bin/python -m benchmarks.bench_metadata --ranks 8 --tensors 20 --layouts fsdp
    [--layers 32] [--tp 8] [--memory-gib 12] [--format 1,2] [--json OUT]

The simulated state is what FSDP2 + AdamW hold for a llama-like model (default: 7B,
hidden 4096, FFN 11008, vocab 32000, 32 layers): per parameter the fp32 weight, its
``exp_avg`` and ``exp_avg_sq`` (sharded like the weight) and its 0-d ``step``
(replicated, written once, by a rank chosen by a hash of its name), plus rank 0's
JSON state tree that refers to every tensor (a ``ModelOptimizerState``'s). ``--tensors T``
keeps the first T sharded tensors (and their steps).

Layouts (``--layouts``), with DTensor's own rules (``torch.chunk``: chunks of
``ceil(n / parts)`` rows, the last ones shorter or empty, so shards are uneven
wherever the world does not divide a dimension, e.g. 11008 rows over 4096 ranks):

- ``fsdp``: FSDP2, every tensor ``Shard(0)`` over all N ranks;
- ``2d``: a (dp = N / tp, tp) mesh, tp innermost as in torchtitan: column-parallel
  weights (q, k, v, gate, up, embedding, output) Shard(0) on tp then Shard(0) on dp
  inside the tp shard, row-parallel ones (o, down) Shard(1) on tp and Shard(0) on dp
  (a grid of pieces), norms Shard(0) on dp and replicated over tp (one writer per dp
  shard, spread over the tp ranks).

Each rank's report is a valid format v1 ``ShardIndex`` (one checksum per MiB chunk,
safetensors headers, data files of at most 512 MiB as the engine cuts them); with
``--format 2`` (the default measures both) the same ShardIndex is the rank's index file,
written under the step, and its report is the v2 one (``v2_report``), and the restoring
side reads only the index files its regions need (``restorer_side_v2``; the v2 columns are
described under the table). Per layout and world size N it measures, each side in its own
forked process (for its peak RSS):

- committer: the real ``ckpt.coordination.ManifestBuilder``: ``add_report`` of every
  other rank's sealed report bytes (as the Redis reader does while ranks write; the
  table shows the total and the time per report: in a burst of reports this is the
  committer's backlog), then after the last report: rank 0's own index, ``render`` and
  ``publish_bytes`` to a ``LocalBackend`` (fsync; the data files exist as sparse files
  of their recorded sizes); the manifest's bytes (raw = stored: v1 stores it as is;
  zstd -3 shown for reference); the report bytes (what Redis holds per unread report);
  the committer's peak RSS growth;
- a restoring rank: discovery as restore does it (``recovery.candidates``: read the
  whole manifest, verify its seal, decode and validate it, check every data file's
  size), bytes and requests of metadata read, peak RSS growth; then the plan of this
  rank's reads (``recovery.plan_reads`` per tensor, as the ``Loader`` plans before it
  reads) for the same world size and for N -> N/2 and N -> 3N/4 (4096 -> 2048 and
  4096 -> 3072), on the first, a middle and the last rank (the slowest is shown), and
  the bytes of piece JSON that plan really uses (what a rank needs of the metadata) and
  the data files (writers) they lie in;
- the save plan every rank computes before staging, in the training thread (the same
  O(world x tensors) shape, though not stored): what ``all_gather_object`` of every
  rank's ``ckpt.engine.describe`` hands each rank (pickled, padded to the largest), the
  time to unpickle it, ``assign_writers`` and this rank's part of it, and its peak RSS; what a
  later save with the same layout costs instead (one digest per rank, ``PlanCache``); and
  the same first save planned from the tensors' layout rules (``rules_side``: what the
  engine does when every tensor is a DTensor, a plain tensor or a block of rows per rank).

After the table, pipeline stages (``--stages``): the model's layers split over S stages,
the first rank of each stage reports its stage's JSON state tree (the others send none),
and the committer parses those reports and merges the trees into the manifest's state
(``ManifestBuilder.render``; ``ckpt.format.merge_trees``): the cost a pipeline-parallel
job adds to the commit after the last report, with the trees' and the merged state's bytes.

World sizes whose estimated memory (from the largest measured size, per piece) exceeds
``--memory-gib`` are not run: their numbers are extrapolated linearly in the number of
pieces from the largest measured size (every measured cost here is O(pieces): the
merge, the manifest, its decode, and the plan, which indexes every piece of each tensor
it touches), and the table marks them ``~``. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import torch

from benchmarks._harness import git_revision, human_bytes, rss_bytes
from ckpt.coordination import ManifestBuilder, publish_bytes
from ckpt.engine import (
    MIN_SPLIT_BYTES,
    REPLICATED,
    MeshRanks,
    PieceInfo,
    Rule,
    Rules,
    ShardedTensor,
    assign_writers,
    description_digest,
    flatten,
    plan_rules,
    seeded_part,
)
from ckpt.format import (
    DEFAULT_CHUNK_BYTES,
    INDEX_DIR,
    TENSOR_REF,
    Box,
    FileHeader,
    Manifest,
    PlanRecord,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
    chunk_count,
    infer_layout,
    load_pieces,
    seal_digest,
    step_prefix,
    writers_needed,
)
from recovery import candidates, plan_reads
from storage_backends import LocalBackend

STEP = 1200
GENERATION = "187d9a0c3f2b4e10-1f2a3-6c1e9b0d"  # as new_generation() spells one
FILE_BYTES = 512 << 20  # the engine's default data file size (SaveOptions.file_bytes)
HEADER_BYTES_PER_MEMBER = 96  # a safetensors header entry: name, dtype, shape, offsets
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TensorSpec:
    """One global tensor of the state.

    Attributes:
        name: its fully-qualified name.
        shape: global shape.
        tp_dim: the dimension tensor parallelism splits (0: column-parallel, 1:
            row-parallel), None when replicated over tp (norms) or not a weight (steps).
        scalar: a 0-d optimizer step, replicated on every rank and written by one.
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    scalar: bool = False


def llama_params(
    layers: int, hidden: int, ffn: int, vocab: int
) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, tp dim) of every parameter of a llama-like decoder."""
    params: list[tuple[str, tuple[int, ...], int | None]] = [
        ("tok_embeddings.weight", (vocab, hidden), 0)
    ]
    for i in range(layers):
        p = f"layers.{i}."
        params += [
            (p + "attention.wq.weight", (hidden, hidden), 0),
            (p + "attention.wk.weight", (hidden, hidden), 0),
            (p + "attention.wv.weight", (hidden, hidden), 0),
            (p + "attention.wo.weight", (hidden, hidden), 1),
            (p + "feed_forward.w1.weight", (ffn, hidden), 0),
            (p + "feed_forward.w2.weight", (hidden, ffn), 1),
            (p + "feed_forward.w3.weight", (ffn, hidden), 0),
            (p + "attention_norm.weight", (hidden,), None),
            (p + "ffn_norm.weight", (hidden,), None),
        ]
    params += [("norm.weight", (hidden,), None), ("output.weight", (vocab, hidden), 0)]
    return params


def model_tensors(args: argparse.Namespace) -> list[TensorSpec]:
    """The state's tensors: weights and AdamW moments (sharded), then one 0-d step per
    parameter kept (replicated); ``args.tensors`` keeps the first T sharded ones."""
    sharded: list[TensorSpec] = []
    scalars: list[TensorSpec] = []
    for name, shape, tp_dim in llama_params(args.layers, args.hidden, args.ffn, args.vocab):
        if args.tensors and len(sharded) >= args.tensors:
            break
        sharded.append(TensorSpec(f"model.{name}", shape, tp_dim))
        sharded += [
            TensorSpec(f"optim.state.{name}.{moment}", shape, tp_dim)
            for moment in ("exp_avg", "exp_avg_sq")
        ]
        scalars.append(TensorSpec(f"optim.state.{name}.step", (), None, scalar=True))
    if args.tensors:
        sharded = sharded[: args.tensors]
    return sharded + scalars


def state_tree(tensors: list[TensorSpec]) -> dict[str, Any]:
    """Rank 0's JSON state tree, as save makes it of a ``ckpt.ModelOptimizerState``: the
    model's parameters and each one's optimizer state by fully-qualified name, and the
    parameter group by its first parameter's name."""
    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for spec in tensors:
        ref = {TENSOR_REF: spec.name}
        if spec.name.startswith("model."):
            model[spec.name.removeprefix("model.")] = ref
        else:
            fqn, moment = spec.name.removeprefix("optim.state.").rsplit(".", 1)
            state.setdefault(fqn, {})[moment] = ref
    params = list(model) or list(state)
    groups = (
        {
            params[0]: {
                "lr": 3e-4,
                "betas": {"__tuple__": [0.9, 0.95]},
                "eps": 1e-8,
                "weight_decay": 0.1,
                "params": params,
            }
        }
        if params
        else {}
    )
    return {
        "model": model,
        "optim": {"state": state, "param_groups": groups},
        "step": STEP,
        "scheduler": {"last_epoch": STEP, "_step_count": STEP},
    }


def stage_of(name: str, stages: int, layers: int) -> int:
    """The pipeline stage holding parameter ``name`` (embedding first, head last)."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) * stages // max(1, layers)
    return 0 if "tok_embeddings" in parts else stages - 1


def stage_trees_side(tensors: list[TensorSpec], stages: int, layers: int) -> dict[str, Any]:
    """Merge the JSON trees of ``stages`` pipeline stages as the committer does."""
    trees = [
        state_tree([t for t in tensors if stage_of(t.name, stages, layers) == s])
        for s in range(stages)
    ]
    reports = [
        ShardIndex(rank=s, tensors={}, files={}, state=tree).to_bytes()
        for s, tree in enumerate(trees)
    ]
    builder = ManifestBuilder(STEP)
    t0 = time.perf_counter()
    for s, data in enumerate(reports):
        builder.add_report(data, f"stage {s}'s report", DEFAULT_CHUNK_BYTES)
    t1 = time.perf_counter()
    manifest = builder.build(generation=GENERATION, world_size=stages, chunk_bytes=1)
    t2 = time.perf_counter()
    return {
        "stages": stages,
        "tree_bytes_max": max(len(r) for r in reports),
        "tree_bytes_total": sum(len(r) for r in reports),
        "parse_s": t1 - t0,
        "merge_s": t2 - t1,
        "state_bytes": len(json.dumps(manifest.state)),
        "partial_maps": len(manifest.partial_maps),
    }


def format_stage_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "pipeline stages: the committer merging one state tree per stage",
        f"{'stages':>6} {'tree max':>10} {'trees':>10} {'parse':>8} {'merge':>8} "
        f"{'state':>10} {'partial':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['stages']:>6} {human_bytes(r['tree_bytes_max']):>10} "
            f"{human_bytes(r['tree_bytes_total']):>10} {r['parse_s'] * 1e3:>6.1f}ms "
            f"{r['merge_s'] * 1e3:>6.1f}ms {human_bytes(r['state_bytes']):>10} "
            f"{r['partial_maps']:>7}"
        )
    lines.append(
        "tree max / trees: the largest and all stage reports (sealed ShardIndex with the "
        "tree); parse: add_report of them all; merge: build (merge_trees); state: the "
        "merged tree's JSON; partial: partial_maps."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """How N ranks hold the state: ``tp`` = 1 is FSDP2 alone, else a (N / tp, tp) mesh."""

    world: int
    tp: int = 1

    @property
    def name(self) -> str:
        return "fsdp" if self.tp == 1 else f"2d tp{self.tp}"

    def boxes(self, spec: TensorSpec, rank: int) -> tuple[Box | None, bool]:
        """The region ``rank`` holds (None: nothing) and whether it writes it."""
        if spec.scalar:
            return Box((), ()), rank == hash_index(spec.name) % self.world
        dp, t = divmod(rank, self.tp)
        dps = self.world // self.tp
        offsets = [0] * len(spec.shape)
        lengths = list(spec.shape)
        writes = True
        if self.tp > 1:
            if spec.tp_dim is None:
                writes = t == dp % self.tp  # replicated over tp: one writer per dp shard
            else:
                d = spec.tp_dim
                offsets[d], lengths[d] = chunk(spec.shape[d], self.tp, t)
        start, length = chunk(lengths[0], dps, dp)
        offsets[0] += start
        lengths[0] = length
        if 0 in lengths:
            return None, False
        return Box(tuple(offsets), tuple(lengths)), writes


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """``torch.chunk``'s i-th of ``parts`` chunks of ``n`` rows: (start, length)."""
    size = -(-n // parts)
    start = min(i * size, n)
    return start, max(0, min(size, n - start))


def hash_index(name: str) -> int:
    return zlib.crc32(name.encode())


def uneven_tensors(tensors: list[TensorSpec], layout: Layout) -> int:
    """Sharded tensors whose pieces are not all the same size (empty ones included)."""
    count = 0
    for spec in tensors:
        if spec.scalar:
            continue
        sizes = set()
        for rank in range(0, layout.world, max(1, layout.world // 64)):
            box, _ = layout.boxes(spec, rank)
            sizes.add(box.numel if box else 0)
        box, _ = layout.boxes(spec, layout.world - 1)
        sizes.add(box.numel if box else 0)
        count += len(sizes) > 1
    return count


# --------------------------------------------------------------------------- the reports


def shard_index(
    rank: int, layout: Layout, tensors: list[TensorSpec], tree: dict[str, Any] | None
) -> ShardIndex:
    """What ``rank`` reports: every tensor it holds, with the pieces it wrote, valid v1."""
    written: list[tuple[TensorSpec, Box]] = []
    entries: dict[str, TensorEntry] = {}
    held: dict[str, TensorSpec] = {}
    for spec in tensors:
        box, writes = layout.boxes(spec, rank)
        if box is None:
            continue
        held[spec.name] = spec
        if writes:
            written.append((spec, box))
    total = sum(box.numel * 4 for _, box in written)
    count = max(1, math.ceil(total / FILE_BYTES))
    per_file = math.ceil(len(written) / count)
    files: dict[str, int] = {}
    headers: dict[str, FileHeader] = {}
    pieces: dict[str, StoredPiece] = {}
    for k in range(count):
        members = written[k * per_file : (k + 1) * per_file]
        path = f"data/{GENERATION}-r{rank:05d}-0a1b2c3d-{k:03d}.safetensors"
        header = 8 + -(-(HEADER_BYTES_PER_MEMBER * len(members) + 64) // 8) * 8
        offset = header
        for spec, box in members:
            nbytes = box.numel * 4
            chunks = chunk_count(nbytes, DEFAULT_CHUNK_BYTES)
            seed = hash_index(spec.name) ^ (rank << 20)
            digests = "".join(
                f"{(seed * 0x9E3779B1 + c) & (2**64 - 1):016x}" for c in range(chunks)
            )
            pieces[spec.name] = StoredPiece.at(box, path, offset, nbytes, "raw", digests)
            offset += nbytes
        files[path] = offset
        headers[path] = FileHeader(header, f"{hash_index(path):016x}")
    for name, spec in held.items():
        piece = pieces.get(name)
        entries[name] = TensorEntry("float32", spec.shape, (piece,) if piece else ())
    return ShardIndex(rank=rank, tensors=entries, files=files, state=tree, headers=headers)


def count_pieces(layout: Layout, tensors: list[TensorSpec]) -> int:
    """Stored pieces of the whole checkpoint, counted from the layout (nothing built)."""
    dps = layout.world // layout.tp
    total = 0
    for spec in tensors:
        if spec.scalar:
            total += 1
        elif layout.tp == 1 or spec.tp_dim is None:
            total += nonempty_chunks(spec.shape[0], dps)
        else:
            for t in range(layout.tp):
                length = chunk(spec.shape[spec.tp_dim], layout.tp, t)[1]
                if length:
                    total += nonempty_chunks(length if spec.tp_dim == 0 else spec.shape[0], dps)
    return total


def nonempty_chunks(n: int, parts: int) -> int:
    """How many of ``torch.chunk``'s ``parts`` chunks of ``n`` rows hold any."""
    return -(-n // -(-n // parts)) if n else 0


# --------------------------------------------------------------------------- the two sides


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layout_cells(
    layout: Layout, tensors: list[TensorSpec]
) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]]:
    """Every tensor's written regions and their writers: the write plan every rank holds."""
    cells: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]] = {}
    for spec in tensors:
        held = cells.setdefault(spec.name, [])
        for rank in range(layout.world):
            box, writes = layout.boxes(spec, rank)
            if box is not None and writes:
                held.append((box.offsets, box.lengths, rank))
    return cells


def v2_report(
    rank: int,
    layout: Layout,
    tensors: list[TensorSpec],
    tree: dict[str, Any] | None,
    cells: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]],
    describers: dict[str, int],
    prefix: Path,
) -> tuple[ShardIndex, float]:
    """Format v2: write ``rank``'s index file under ``prefix``; its report (the layouts it
    describes, as ``ckpt.engine`` makes them) and the seconds spent inferring them."""
    full = shard_index(rank, layout, tensors, None)
    index = ShardIndex(
        rank=rank,
        tensors={n: e for n, e in full.tensors.items() if e.pieces},
        files=full.files,
        headers=full.headers,
    )
    data = index.to_bytes()
    path = f"{INDEX_DIR}/{GENERATION}-r{rank:05d}-0a1b2c3d.json"
    (prefix / path).write_bytes(data)
    t0 = time.perf_counter()
    described = {}
    for spec in tensors:
        if describers[spec.name] == rank:
            layout_of = infer_layout(spec.shape, cells[spec.name])
            # A tensor this rank stores whole keeps its pieces in the manifest too.
            whole = full.tensors[spec.name].pieces if layout_of.sole_writer == rank else ()
            described[spec.name] = TensorEntry("float32", spec.shape, whole, layout_of)
    infer_s = time.perf_counter() - t0
    report = ShardIndex(
        rank=rank,
        tensors=described,
        files={**full.files, path: len(data)},
        state=tree,
        writer=WriterRef(rank, path, len(data), seal_digest(data)),
    )
    return report, infer_s


def committer_side(
    root: str, layout: Layout, tensors: list[TensorSpec], version: int = 1
) -> dict[str, Any]:
    """Merge every rank's report and publish the manifest; rank 0 is the committer.

    Format v2: every rank first writes its index file and reports the layouts it
    describes (a few hundred bytes for most ranks)."""
    tree = state_tree(tensors)
    backend = LocalBackend(root)
    prefix = Path(root) / step_prefix(STEP)
    (prefix / "data").mkdir(parents=True)
    if version == 2:
        (prefix / INDEX_DIR).mkdir()
        cells = layout_cells(layout, tensors)
        # The lowest writer of each tensor describes its layout (every rank knows the plan).
        describers = {name: min(c[2] for c in written) for name, written in cells.items()}

    def report_of(rank: int, tree: dict[str, Any] | None) -> tuple[ShardIndex, float]:
        if version == 1:
            return shard_index(rank, layout, tensors, tree), 0.0
        return v2_report(rank, layout, tensors, tree, cells, describers, prefix)

    base_rss = rss_bytes()
    merge_s = infer_s = 0.0
    report_bytes: list[int] = []
    index_bytes: list[int] = []
    builder = ManifestBuilder(STEP)
    for rank in range(1, layout.world + 1):
        report, inferred = report_of(rank % layout.world, tree if rank == layout.world else None)
        infer_s = max(infer_s, inferred)
        sparse_files(prefix, {p: n for p, n in report.files.items() if p.startswith("data/")})
        index_bytes.append(report.writer.bytes if report.writer else 0)
        data = report.to_bytes()
        report_bytes.append(len(data))
        t0 = time.perf_counter()
        if rank < layout.world:
            builder.add_report(data, f"rank {rank}'s report", DEFAULT_CHUNK_BYTES)
            merge_s += time.perf_counter() - t0
        else:  # the committer's own report, then the commit
            builder.add(report)
        del report, data
    manifest = builder.render(
        generation=GENERATION,
        world_size=layout.world,
        chunk_bytes=DEFAULT_CHUNK_BYTES,
        created_unix=time.time(),
        layout={"mesh": [layout.world // layout.tp, layout.tp]},
    )
    t1 = time.perf_counter()
    publish_bytes(backend, STEP, GENERATION, manifest, files=builder.files)
    t2 = time.perf_counter()
    peak = peak_rss() - base_rss
    del builder
    result = {
        "manifest_bytes": len(manifest),
        "manifest_zstd_bytes": compressed_size(manifest),
        "report_bytes_mean": sum(report_bytes) / len(report_bytes),
        "report_bytes_total": sum(report_bytes),
        "files": sum(1 for _ in prefix.joinpath("data").iterdir()),
        "merge_s": merge_s,
        "merge_us_per_report": merge_s * 1e6 / max(1, layout.world - 1),
        "render_s": t1 - t0,
        "publish_s": t2 - t1,
        "committer_rss": peak,
    }
    if version == 2:
        result.update(index_bytes_max=max(index_bytes), infer_s=infer_s)
    return result


def restorer_side_v2(root: str, layout: Layout, tensors: list[TensorSpec]) -> dict[str, Any]:
    """Format v2, one restoring rank at a time: discovery (the manifest, one listing), then
    for each sampled rank of each target world: the index files its regions need, read and
    checked (``ckpt.format.load_pieces``), and its reads planned."""
    backend = LocalBackend(root)
    base_rss = rss_bytes()
    head, discover_s = discover(backend)
    manifest_bytes = (Path(root) / step_prefix(STEP) / "manifest.json").stat().st_size
    result: dict[str, Any] = {
        "discover_s": discover_s,
        "read_bytes": manifest_bytes,
        "read_requests": 1 + (1 if len(head.files) > 256 else len(head.files)),
        "restore_rss": peak_rss() - base_rss,
        "plans": {},
    }
    for target_world in target_worlds(layout.world):
        target = Layout(target_world, layout.tp if target_world % layout.tp == 0 else 1)
        worst: dict[str, float] = {
            "plan_s": 0.0,
            "needed_bytes": 0,
            "needed_pieces": 0,
            "needed_files": 0,
            "total_bytes": 0,
        }
        for rank in sorted({0, target_world // 2, target_world - 1}):
            wanted: dict[str, list[Box]] = {}
            for spec in tensors:
                box, _ = target.boxes(spec, rank)
                if box is not None:
                    wanted[spec.name] = [box]
            t2 = time.perf_counter()
            refs = writers_needed(head, wanted)
            loaded = load_pieces(backend, head, wanted)
            requests = []
            for i, (name, boxes) in enumerate(wanted.items()):
                requests.extend(plan_reads(name, loaded.tensors[name], [(i, boxes[0])]))
            seconds = time.perf_counter() - t2
            index_read = sum(r.bytes for r in refs)
            plan = {
                "plan_s": seconds,
                "needed_bytes": index_read,
                "needed_pieces": len({id(r.piece) for r in requests}),
                "needed_files": len(refs),
                "total_bytes": manifest_bytes + index_read,
            }
            for key, value in plan.items():
                worst[key] = max(worst[key], value)
        result["plans"][str(target_world)] = worst
    result["restore_rss"] = peak_rss() - base_rss
    # The first save after the restore, on the same world size: each rank takes its part of
    # the plan from the manifest's layouts (``ckpt.engine.seeded_part``) instead of the full
    # exchange. The benchmark's reports record no plan key: give the manifest one.
    head = msgspec.structs.replace(head, plan=PlanRecord("0" * 32, 1.0))
    result["seeded_s"] = 0.0
    for rank in sorted({0, layout.world - 1}):
        own = flatten(own_tensors(layout, tensors, rank))[0]
        t3 = time.perf_counter()
        if seeded_part(head, rank, own) is None:
            raise SystemExit(
                f"rank {rank}: the manifest's layouts do not give its part of the plan"
            )
        result["seeded_s"] = max(result["seeded_s"], time.perf_counter() - t3)
    return result


def sparse_files(prefix: Path, files: dict[str, int]) -> None:
    """The data files a report names, as sparse files of their recorded sizes."""
    for path, size in files.items():
        with open(prefix / path, "wb") as f:
            f.truncate(size)


def planner_side(layout: Layout, tensors: list[TensorSpec]) -> dict[str, Any]:
    """The save plan every rank computes before staging (in the training thread): the
    ``all_gather`` of every rank's ``describe`` (pickled by ``all_gather_object``, padded to
    the largest), then ``assign_writers`` and this rank's part (``WritePlan.for_rank``)."""
    payloads = []
    for rank in range(layout.world):
        infos = []
        for spec in tensors:
            box, _ = layout.boxes(spec, rank)
            if box is not None:
                infos.append(PieceInfo(spec.name, box.offsets, box.lengths, box.numel * 4))
        payloads.append(pickle.dumps(infos))
    last_rank_holds = [info.key for info in infos]
    base_rss = rss_bytes()
    gc.disable()  # as ckpt.engine.PlanCache plans: no cyclic collections meanwhile
    t0 = time.perf_counter()
    per_rank = [pickle.loads(p) for p in payloads]
    t1 = time.perf_counter()
    plan = assign_writers(per_rank, min_split_bytes=max(MIN_SPLIT_BYTES, DEFAULT_CHUNK_BYTES))
    t2 = time.perf_counter()
    gc.enable()
    plan.for_rank(layout.world - 1, last_rank_holds)
    t3 = time.perf_counter()
    # How many ranks the planner spreads the replicated 0-d tensors (optimizer steps) over:
    # a restoring rank needs every one of them.
    scalar_writers = {s.rank for key, shares in plan.shares.items() if not key[1] for s in shares}
    # A later save with the same layout: each rank digests its own tensors and the ranks
    # exchange one (digest, plan held) pair each (``ckpt.engine``'s PlanCache).
    flat = flatten(own_tensors(layout, tensors, layout.world - 1))[0]
    t4 = time.perf_counter()
    digest = description_digest(flat, max(MIN_SPLIT_BYTES, DEFAULT_CHUNK_BYTES))
    t5 = time.perf_counter()
    return {
        **rules_side(layout, tensors),
        "reuse_gather_bytes": layout.world * len(pickle.dumps((digest, digest))),
        "digest_s": t5 - t4,
        "gather_bytes": layout.world * max(len(p) for p in payloads),
        "unpickle_s": t1 - t0,
        "assign_s": t2 - t1,
        "boxes_for_s": t3 - t2,
        "plan_rss": peak_rss() - base_rss,
        "scalar_writers": len(scalar_writers),
    }


def layout_rule(layout: Layout, spec: TensorSpec) -> tuple[MeshRanks | None, tuple[int, ...]]:
    """The mesh and shards of ``spec`` in ``layout``, as DTensor placements would give
    them (None: a 0-d step every rank holds whole)."""
    if spec.scalar:
        return None, ()
    if layout.tp == 1:
        return MeshRanks((layout.world,), tuple(range(layout.world))), (0,)
    dps = layout.world // layout.tp
    by_dp = MeshRanks((dps, layout.tp), tuple(range(layout.world)))
    if spec.tp_dim is None:
        return by_dp, (0, REPLICATED)
    if spec.tp_dim == 0:  # tp splits the rows first, dp splits each tp block
        by_tp = tuple(dp * layout.tp + t for t in range(layout.tp) for dp in range(dps))
        return MeshRanks((layout.tp, dps), by_tp), (0, 0)
    return by_dp, (0, spec.tp_dim)


def rules_side(layout: Layout, tensors: list[TensorSpec]) -> dict[str, Any]:
    """The first save planned from rules (``ckpt.engine.regular_plan``): every rank holds
    the same rules here, so one rank's rules and one (digest, bytes held alone) pair per
    rank are exchanged; then each rank plans (``plan_rules``), takes its part, and the
    describing rank (rank 0, in its persist thread) infers its layouts."""
    meshes: dict[MeshRanks, int] = {}
    described = []
    for spec in sorted(tensors, key=lambda s: s.name):
        mesh, shards = layout_rule(layout, spec)
        index = -1 if mesh is None else meshes.setdefault(mesh, len(meshes))
        described.append((spec.name, Rule("float32", spec.shape, index, shards)))
    digest = "0" * 32
    unique = [0] * layout.world
    for spec in tensors:
        if spec.scalar or (layout.tp > 1 and spec.tp_dim is None):
            continue
        for rank in range(layout.world):
            box, _ = layout.boxes(spec, rank)
            if box is not None:
                unique[rank] += box.numel * 4
    rules = Rules(tuple(meshes), tuple(described), unique[0], digest)
    gathered = layout.world * len(pickle.dumps((digest, max(unique)))) + len(pickle.dumps(rules))
    min_split = max(MIN_SPLIT_BYTES, DEFAULT_CHUNK_BYTES)
    t0 = time.perf_counter()
    plan = plan_rules(
        {digest: rules}, {digest: list(range(layout.world))}, unique, min_split_bytes=min_split
    )
    t1 = time.perf_counter()
    if plan is None:
        raise SystemExit(f"{layout.name}: the rules of the simulated state contradict each other")
    part_s = 0.0
    for rank in sorted({0, layout.world - 1}):
        own = flatten(own_tensors(layout, tensors, rank))[0]
        t2 = time.perf_counter()
        plan.part_of(rank, own)
        part_s = max(part_s, time.perf_counter() - t2)
    t3 = time.perf_counter()
    described_by_0 = 0
    for spec in tensors:
        if plan.written_layout(spec.name, 0, spec.shape) is not None:
            described_by_0 += 1
    t4 = time.perf_counter()
    return {
        "rules_gather_bytes": gathered,
        "rules_plan_s": t1 - t0,
        "rules_part_s": part_s,
        "rules_describe_s": t4 - t3,
        "rules_described": described_by_0,
    }


def own_tensors(layout: Layout, tensors: list[TensorSpec], rank: int) -> dict[str, Any]:
    """What ``rank`` holds, as a state of (uninitialised) sharded tensors."""
    own = {}
    for spec in tensors:
        box, _ = layout.boxes(spec, rank)
        if box is not None:
            own[spec.name] = ShardedTensor(torch.empty(box.lengths), spec.shape, box.offsets)
    return own


def compressed_size(data: bytes) -> int | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=3).compress(data))


def discover(backend: LocalBackend) -> tuple[Manifest, float]:
    """The newest step as restore finds it (``recovery.candidates``), and the seconds taken."""
    t0 = time.perf_counter()
    found = next(candidates(backend))
    seconds = time.perf_counter() - t0
    if found.manifest is None:
        raise SystemExit(f"the benchmark's checkpoint does not validate: {found.error}")
    return found.manifest, seconds


def restorer_side(root: str, layout: Layout, tensors: list[TensorSpec]) -> dict[str, Any]:
    """Discover the step as restore does, then plan sample ranks' reads on other worlds."""
    backend = LocalBackend(root)
    base_rss = rss_bytes()
    manifest, discover_s = discover(backend)
    discover_rss = peak_rss() - base_rss
    result: dict[str, Any] = {
        "discover_s": discover_s,
        "read_bytes": (Path(root) / step_prefix(STEP) / "manifest.json").stat().st_size,
        "read_requests": 1 + len(manifest.files),
        "restore_rss": discover_rss,
        "plans": {},
    }
    pieces_total = sum(len(e.pieces) for e in manifest.tensors.values())
    result["pieces"] = pieces_total
    for target_world in target_worlds(layout.world):
        target = Layout(target_world, layout.tp if target_world % layout.tp == 0 else 1)
        worst: dict[str, float] = {
            "plan_s": 0.0,
            "needed_bytes": 0,
            "needed_pieces": 0,
            "needed_files": 0,
        }
        for rank in sorted({0, target_world // 2, target_world - 1}):
            plan = plan_rank(manifest.tensors, target, tensors, rank)
            for key, value in plan.items():
                worst[key] = max(worst[key], value)
        result["plans"][str(target_world)] = worst
    return result


def plan_rank(
    stored: dict[str, TensorEntry], target: Layout, tensors: list[TensorSpec], rank: int
) -> dict[str, float]:
    """Plan ``rank``'s reads of every tensor it holds in ``target`` (no data is read)."""
    targets = []
    for spec in tensors:
        box, _ = target.boxes(spec, rank)
        if box is not None:
            targets.append((spec.name, box))
    t0 = time.perf_counter()
    requests = []
    for i, (name, box) in enumerate(targets):
        requests.extend(plan_reads(name, stored[name], [(i, box)]))
    seconds = time.perf_counter() - t0
    used = {id(r.piece): r.piece for r in requests}
    return {
        "plan_s": seconds,
        "needed_pieces": len(used),
        "needed_files": len({p.file for p in used.values()}),
        "needed_bytes": sum(len(msgspec.json.encode(p)) for p in used.values()),
    }


def target_worlds(world: int) -> list[int]:
    worlds = [world]
    for w in (world // 2, world * 3 // 4):
        if w >= 1 and w not in worlds:
            worlds.append(w)
    return worlds


def _child(conn: Connection, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:
        import traceback

        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked process (its own peak RSS) and return its result."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, *args))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise SystemExit(
            f"{fn.__name__} died (exit code {proc.exitcode}; out of memory?)"
        ) from None
    proc.join()
    if status != "ok":
        raise SystemExit(f"{fn.__name__} failed:\n{value}")
    result: dict[str, Any] = value
    return result


# --------------------------------------------------------------------------- one run


@dataclass
class Row:
    """One layout at one world size: measured, or extrapolated from ``basis`` ranks."""

    layout: str
    world: int
    tensors: int
    pieces: int
    uneven: int
    measured: bool
    basis: int
    committer: dict[str, Any]
    restorer: dict[str, Any]
    save_plan: dict[str, Any]


def measured_row(
    name: str,
    layout: Layout,
    tensors: list[TensorSpec],
    committer: dict[str, Any],
    restorer: dict[str, Any],
    save_plan: dict[str, Any],
) -> Row:
    return Row(
        name,
        layout.world,
        len(tensors),
        count_pieces(layout, tensors),
        uneven_tensors(tensors, layout),
        True,
        layout.world,
        committer,
        restorer,
        save_plan,
    )


def measure(
    layout: Layout, tensors: list[TensorSpec], workdir: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    root = tempfile.mkdtemp(prefix="bench-metadata-", dir=workdir)
    try:
        committer = in_child(committer_side, root, layout, tensors)
        restorer = in_child(restorer_side, root, layout, tensors)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return committer, restorer, in_child(planner_side, layout, tensors)


def extrapolate(base: Row, layout: Layout, tensors: list[TensorSpec], pieces: int) -> Row:
    """``base``'s O(pieces) numbers scaled to ``pieces``; counts recomputed exactly."""
    k = pieces / base.pieces
    scaled = {"manifest_bytes", "manifest_zstd_bytes", "report_bytes_total", "merge_s"}
    scaled |= {"render_s", "publish_s", "committer_rss"}
    committer = {
        key: (value * k if key in scaled and value is not None else value)
        for key, value in base.committer.items()
    }
    committer["merge_us_per_report"] = committer["merge_s"] * 1e6 / max(1, layout.world - 1)
    committer["report_bytes_mean"] = committer["report_bytes_total"] / layout.world
    committer["files"] = base.committer["files"] * layout.world // base.world
    restorer = {
        key: value * k
        for key, value in base.restorer.items()
        if key in ("discover_s", "read_bytes", "restore_rss")
    }
    restorer["read_requests"] = 1 + committer["files"]
    restorer["pieces"] = pieces
    restorer["plans"] = {}
    base_plans = list(base.restorer["plans"].values())
    for target_world, plan in zip(target_worlds(layout.world), base_plans):
        # The plan indexes every stored piece of each tensor: O(pieces); what a rank uses
        # grows with its own share (the same at the same ratio of worlds).
        restorer["plans"][str(target_world)] = {
            "plan_s": plan["plan_s"] * k,
            "needed_bytes": plan["needed_bytes"],
            "needed_pieces": plan["needed_pieces"],
            "needed_files": plan["needed_files"],
        }
    save_plan = {key: value * k for key, value in base.save_plan.items()}
    save_plan["scalar_writers"] = base.save_plan["scalar_writers"]
    save_plan["digest_s"] = base.save_plan["digest_s"]  # one rank's own tensors
    save_plan["reuse_gather_bytes"] = base.save_plan["reuse_gather_bytes"] * (
        layout.world / base.world
    )
    return Row(
        layout.name,
        layout.world,
        base.tensors,
        pieces,
        uneven_tensors(tensors, layout),
        False,
        base.world,
        committer,
        restorer,
        save_plan,
    )


def run_layout_v2(
    args: argparse.Namespace, tp: int, tensors: list[TensorSpec], workdir: Path
) -> list[Row]:
    """Format v2 at every world size, measured (its memory grows with one rank's pieces)."""
    rows: list[Row] = []
    for world in args.ranks:
        if world % tp:
            continue
        layout = Layout(world, tp)
        root = tempfile.mkdtemp(prefix="bench-metadata-v2-", dir=workdir)
        t0 = time.perf_counter()
        try:
            committer = in_child(committer_side, root, layout, tensors, 2)
            restorer = in_child(restorer_side_v2, root, layout, tensors)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(
            f"  {layout.name} v2 {world} ranks: measured in {time.perf_counter() - t0:.1f} s, "
            f"load average after {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
        )
        # The save plan does not depend on the format: measured here when v1 is not run.
        plan = {} if "1" in args.format else in_child(planner_side, layout, tensors)
        rows.append(measured_row(f"{layout.name} v2", layout, tensors, committer, restorer, plan))
    return rows


def run_layout(
    args: argparse.Namespace, tp: int, tensors: list[TensorSpec], workdir: Path
) -> list[Row]:
    rows: list[Row] = []
    for world in args.ranks:
        if world % tp:
            print(f"  skipping {world} ranks with tp={tp}: not divisible", file=sys.stderr)
            continue
        layout = Layout(world, tp)
        pieces = count_pieces(layout, tensors)
        measured = [r for r in rows if r.measured]
        if measured:
            base = measured[-1]
            per_piece = (
                max(
                    base.committer["committer_rss"],
                    base.restorer["restore_rss"],
                    base.save_plan["plan_rss"],
                )
                / base.pieces
            )
            if per_piece * pieces > args.memory_gib * (1 << 30):
                rows.append(extrapolate(base, layout, tensors, pieces))
                print(f"  {layout.name} {world}: extrapolated from {base.world}", file=sys.stderr)
                continue
        t0 = time.perf_counter()
        committer, restorer, save_plan = measure(layout, tensors, workdir)
        print(
            f"  {layout.name} {world} ranks x {len(tensors)} tensors: {pieces} pieces, "
            f"measured in {time.perf_counter() - t0:.1f} s, load average after "
            f"{os.getloadavg()[0]:.1f}",
            file=sys.stderr,
        )
        rows.append(measured_row(layout.name, layout, tensors, committer, restorer, save_plan))
    return rows


# --------------------------------------------------------------------------- the table


def format_rows(rows: list[Row]) -> str:
    head = (
        f"{'layout':<9} {'ranks':>5} {'pieces':>9} {'manifest':>10} {'zstd':>9} "
        f"{'report':>9} {'merge/rep':>9} {'merge all':>9} {'render':>8} {'publish':>8} "
        f"{'commit RSS':>10} | {'discover':>8} {'read':>10} {'reqs':>5} {'RSS':>9} | "
        f"{'target':>6} {'plan':>8} {'needed':>9} {'files':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c, s = r.committer, r.restorer
        mark = " " if r.measured else "~"
        zstd = human_bytes(c["manifest_zstd_bytes"]) if c["manifest_zstd_bytes"] else "-"
        left = (
            f"{r.layout:<9} {r.world:>5}{mark}{r.pieces:>9} {human_bytes(c['manifest_bytes']):>10} "
            f"{zstd:>9} {human_bytes(c['report_bytes_mean']):>9} "
            f"{c['merge_us_per_report'] / 1e3:>7.2f}ms {c['merge_s']:>8.2f}s "
            f"{c['render_s'] * 1e3:>6.0f}ms {c['publish_s'] * 1e3:>6.0f}ms "
            f"{human_bytes(c['committer_rss']):>10} | {s['discover_s']:>7.2f}s "
            f"{human_bytes(s['read_bytes']):>10} {s['read_requests']:>5} "
            f"{human_bytes(s['restore_rss']):>9} |"
        )
        for i, (target, plan) in enumerate(s["plans"].items()):
            prefix = left if i == 0 else " " * len(left)
            lines.append(
                f"{prefix} {int(target):>6} {plan['plan_s'] * 1e3:>6.0f}ms "
                f"{human_bytes(plan['needed_bytes']):>9} {plan['needed_files']:>5}"
            )
    v2 = [r for r in rows if "infer_s" in r.committer]
    if v2:
        lines += ["", "format v2 (per target: the slowest sampled rank):"]
        head = (
            f"{'layout':<9} {'ranks':>5} {'infer':>8} {'index max':>10} {'seeded plan':>11} | "
            f"{'target':>6} {'indexes':>7} {'metadata read':>13} {'load+plan':>9}"
        )
        lines += [head, "-" * len(head)]
        for r in v2:
            c = r.committer
            left = (
                f"{r.layout:<9} {r.world:>5} {c['infer_s']:>7.2f}s "
                f"{human_bytes(c['index_bytes_max']):>10} "
                f"{r.restorer['seeded_s'] * 1e3:>9.1f}ms |"
            )
            for i, (target, plan) in enumerate(r.restorer["plans"].items()):
                prefix = left if i == 0 else " " * len(left)
                lines.append(
                    f"{prefix} {int(target):>6} {plan['needed_files']:>7} "
                    f"{human_bytes(plan['total_bytes']):>13} {plan['plan_s'] * 1e3:>7.0f}ms"
                )
    lines += ["", "save plan (every rank, before staging, in the training thread):"]
    head = (
        f"{'layout':<9} {'ranks':>5} {'gathered':>10} {'unpickle':>9} {'assign':>9} "
        f"{'own part':>9} {'RSS':>9} {'uneven':>6} {'0-d writers':>11} | "
        f"{'reused: gathered':>16} {'digest':>8} | {'rules: gathered':>15} {'plan':>8} "
        f"{'own part':>9} {'describe':>8}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        p = r.save_plan
        if not p:
            continue
        mark = " " if r.measured else "~"
        lines.append(
            f"{r.layout:<9} {r.world:>5}{mark}{human_bytes(p['gather_bytes']):>10} "
            f"{p['unpickle_s']:>8.2f}s {p['assign_s']:>8.2f}s {p['boxes_for_s']:>8.2f}s "
            f"{human_bytes(p['plan_rss']):>9} {r.uneven:>6} {p['scalar_writers']:>11} | "
            f"{human_bytes(p['reuse_gather_bytes']):>16} {p['digest_s'] * 1e3:>6.1f}ms | "
            f"{human_bytes(p['rules_gather_bytes']):>15} {p['rules_plan_s']:>7.2f}s "
            f"{p['rules_part_s']:>8.2f}s {p['rules_describe_s']:>7.2f}s"
        )
    return "\n".join(lines)


LEGEND = """\
manifest: manifest.json (v1: every piece; v2: layouts + writers); zstd: at zstd -3 (reference).
report: mean sealed ShardIndex per rank (what a Redis stream holds per unread report).
merge/rep, merge all: ManifestBuilder.add_report per report and for all N-1 (done while
  ranks write; in a burst of reports, the committer's backlog after the last one).
render: after the last report, rank 0's own index + ManifestBuilder.render (seal included);
publish: publish_bytes to a LocalBackend (data files listed, manifest written + fsynced).
commit RSS / RSS: peak RSS growth of the committer / of one restoring rank.
discover: recovery.candidates on one rank: read + seal + decode + validate the manifest
  and check every data file's size; read: metadata bytes that rank reads; reqs: storage
  requests for it (1 manifest GET + 1 size per data file).
target: world size restored onto (same layout family); plan: recovery.plan_reads for
  every tensor of the slowest of 3 sampled ranks; needed: piece JSON that plan uses;
  files: data files (= writers) those pieces lie in (maxima over the sampled ranks).
gathered: bytes each rank receives from the planning all_gather_object (N payloads,
  padded to the largest); unpickle, assign (assign_writers), own part (WritePlan.for_rank,
  what a rank keeps): each rank's Python time; RSS: peak growth; uneven: sharded tensors whose shards differ in size;
  0-d writers: ranks assign_writers spreads the replicated 0-d steps over.
  reused: a later save with an unchanged layout (ckpt.engine.PlanCache): gathered = the
  (digest, plan held) pairs each rank receives; digest = description_digest of one rank's
  own tensors. The full exchange and assignment run only on the first save, after a rank
  restarts, or when a layout changes.
  rules: the same first save planned from rules (ckpt.engine.regular_plan, what the engine
  does when every tensor is a DTensor, a plain tensor or a block of rows per rank):
  gathered = one (digest, bytes held alone) pair per rank + one rank's rules; plan =
  plan_rules (the replicated pieces, from the rules); own part = RegularPlan.part_of
  (slower of ranks 0 and N-1); describe = rank 0's layouts from the plan
  (RegularPlan.written_layout, in its persist thread). The plan is the one assign_writers makes.
~: extrapolated linearly in pieces from the largest measured world (not run).
v2 rows: report = what a rank sends the committer (its index file is on storage); read =
  the manifest; reqs = 1 GET + 1 listing; plan = reading and checking the index files the
  rank's regions need (ckpt.format.load_pieces) + plan_reads; needed = those index files'
  bytes; files = how many. infer: the describing rank's layout inference (in its persist
  thread, while it writes); index max: the largest index file; metadata read: manifest +
  index files one restoring rank reads; seeded plan: the first save after a restore on the
  same world size, where each rank takes its part of the write plan from the restored
  manifest's layouts (ckpt.engine.seeded_part; slower of ranks 0 and N-1) instead of the
  full exchange and assignment of the save plan table."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--layouts", default="fsdp,2d", help="fsdp and/or 2d")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size of the 2d mesh")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tensors", type=int, default=0, help="keep the first T sharded tensors")
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=12.0,
        help="extrapolate world sizes estimated to need more than this per process",
    )
    parser.add_argument(
        "--stages",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 16, 32],
        help="pipeline stages whose state trees the committer merges (after the table)",
    )
    parser.add_argument("--quick", action="store_true", help="256 ranks, fsdp and 2d")
    parser.add_argument("--format", default="1,2", help="format versions to measure: 1, 2 or 1,2")
    parser.add_argument("--dir", type=Path, default=None, help="where the sparse files go")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.ranks is None:
        args.ranks = [256] if args.quick else [1024, 4096]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tensors = model_tensors(args)
    sharded = sum(1 for t in tensors if not t.scalar)
    print(
        f"bench_metadata at {git_revision(REPO)}: {args.layers} layers, hidden {args.hidden}, "
        f"{sharded} sharded tensors + {len(tensors) - sharded} replicated 0-d steps "
        f"({sum(math.prod(t.shape) for t in tensors) * 4 / 1e9:.1f} GB fp32), "
        f"ranks {args.ranks}, layouts {args.layouts}"
    )
    workdir = args.dir or Path(tempfile.gettempdir())
    rows: list[Row] = []
    for name in args.layouts.split(","):
        tp = {"fsdp": 1, "2d": args.tp}[name.strip()]
        if "1" in args.format:
            rows += run_layout(args, tp, tensors, workdir)
        if "2" in args.format:
            rows += run_layout_v2(args, tp, tensors, workdir)
    print(format_rows(rows))
    print(LEGEND)
    stage_rows = [stage_trees_side(tensors, s, args.layers) for s in args.stages]
    print(format_stage_rows(stage_rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        args.json.with_name(args.json.stem + "-stages.json").write_text(
            json.dumps(stage_rows, indent=1)
        )


if __name__ == "__main__":
    main()
