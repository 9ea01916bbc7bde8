"""``ckpt.dcp.Writer`` / ``ckpt.dcp.Reader``: real torch.distributed.checkpoint, both ways.

* ``dcp.save(..., storage_writer=Writer(url))`` -> ``ckpt.load``, bit for bit: a model, an
  Adam optimizer that has stepped, plain values; the checkpoint verifies (checksums) and
  is refused for a second writer of the same step; a failing write commits nothing; a
  value that would need pickle is refused by name;
* ``ckpt.save`` -> ``dcp.load(..., storage_reader=Reader(url))``, bit for bit;
* resharding on real gloo ranks: DTensors saved on 2 ranks (by DCP through the Writer, and
  by ``ckpt.save``) load on 1 rank and on 3 ranks through the Reader (and ``ckpt.load``);
  ``dcp.async_save`` with the Writer commits too;
* pipeline stages saved through the Writer (each rank its own keys) load strictly with
  ``ckpt.load`` on each stage, as ``ckpt.save``'s do;
* one case through S3 (moto on loopback);
* ``ckpt.dcp`` is there after a plain ``import ckpt``, which imports no DCP.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import ckpt
from ckpt.dcp import Reader, Writer
from ckpt.format import read_manifest, scan_steps
from recovery import committed_steps, validate_files, verify_checkpoint
from storage_backends import LocalBackend, StorageBackend
from tests.support.cli import run_cli
from tests.support.faulty import FaultyBackend
from tests.support.gloo import run_ranks
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3

__all__ = ["aws_test_env", "moto_s3"]  # fixtures used here

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled, unavailable or uninitialized"
)


# --------------------------------------------------------------------------- one process


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    return model, opt


def _fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def _assert_same_training_state(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    for (name, x), (_, y) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, per_param in sa["state"].items():
        for field, value in per_param.items():
            assert torch.equal(value, sb["state"][k][field]), (k, field)


EXTRA = {"epoch": 3, "tag": "run-a", "betas": (0.5, 0.25), "lrs": [0.1, 0.01], "none": None}


def test_dcp_save_then_ckpt_load_is_bit_exact_and_verifies(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _trained(0)
    state = {"model": saved[0].state_dict(), "optim": saved[1].state_dict(), "extra": EXTRA}
    dcp.save(state, storage_writer=Writer(root, user_metadata={"who": "dcp"}))

    backend = LocalBackend(root)
    assert committed_steps(backend) == [0]  # no step given: newest committed + 1, from 0
    manifest = read_manifest(backend, 0)
    validate_files(backend, manifest)
    verify_checkpoint(backend, manifest)  # every chunk's checksum, every header
    assert manifest.user_metadata == {"who": "dcp"}
    assert all(p.checksums for e in manifest.tensors.values() for p in e.pieces)
    code, out = run_cli(monkeypatch, "verify", str(root))
    assert code == 0, out
    # The names ckpt.save gives the same state: modules, optimizer state, plain values.
    ckpt.save({"model": saved[0], "optim": saved[1], "extra": EXTRA}, root, step=1)
    assert read_manifest(backend, 1).state == manifest.state
    assert set(read_manifest(backend, 1).tensors) == set(manifest.tensors)

    loaded = _fresh(1)
    extra: dict[str, Any] = {}
    assert ckpt.load({"model": loaded[0], "optim": loaded[1], "extra": extra}, root, step=0) == 0
    _assert_same_training_state(saved, loaded)
    assert extra == EXTRA


def test_ckpt_save_then_dcp_load_is_bit_exact(root: Path) -> None:
    saved = _trained(2)
    ckpt.save({"model": saved[0], "optim": saved[1], "extra": EXTRA}, root, step=7)

    loaded = _trained(3)  # DCP loads in place: the target's optimizer must have state
    target = {
        "model": loaded[0].state_dict(),
        "optim": loaded[1].state_dict(),
        "extra": {k: None for k in EXTRA},
    }
    reader = Reader(root)
    dcp.load(target, storage_reader=reader)
    assert reader.step == 7
    loaded[1].load_state_dict(target["optim"])
    _assert_same_training_state(saved, loaded)
    assert target["extra"] == EXTRA


class _App:
    """A DCP ``Stateful`` object (and a ckpt one): a tensor, a number, nested containers."""

    def __init__(self, scale: float) -> None:
        self.t = torch.arange(4.0) * scale
        self.n = int(scale)
        self.groups: list[Any] = [{"a": scale}, {"b": (1, 2)}]

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "n": self.n, "groups": self.groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.n, self.groups = state["t"], state["n"], state["groups"]


def test_modules_and_stateful_objects_given_to_dcp_directly(root: Path) -> None:
    model, _ = _trained(12)
    dcp.save({"model": model, "app": _App(3.0)}, storage_writer=Writer(root))
    for load in ("ckpt", "dcp"):
        again, app = _fresh(13)[0], _App(0.0)
        if load == "ckpt":
            ckpt.load({"model": again, "app": app}, root)
        else:
            dcp.load({"model": again, "app": app}, storage_reader=Reader(root))
        assert torch.equal(app.t, torch.arange(4.0) * 3.0) and app.n == 3, load
        assert app.groups == [{"a": 3.0}, {"b": (1, 2)}], load
        for name, value in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], value), (load, name)


def test_reader_casts_to_the_target_dtype_and_reads_a_subset(root: Path) -> None:
    model, _ = _trained(14)
    ckpt.save({"model": model}, root, step=2)
    weight, bias = model.state_dict()["0.weight"], model.state_dict()["0.bias"]
    target = {
        "model": {
            "0.weight": torch.zeros(weight.shape, dtype=torch.bfloat16),
            "0.bias": torch.zeros(bias.shape, dtype=torch.float64)[None, :].t()[:, 0],
        }
    }  # the bias target is a non-contiguous view
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(target, storage_reader=Reader(root), planner=planner)
    assert torch.equal(target["model"]["0.weight"], weight.to(torch.bfloat16))
    assert torch.equal(target["model"]["0.bias"], bias.double())


def test_reader_passes_over_a_damaged_newest_step_and_detects_rotten_bytes(root: Path) -> None:
    for step in (1, 2):
        ckpt.save({"t": torch.full((1000,), float(step))}, root, step=step)
    (data,) = (root / "step-000000002" / "data").iterdir()
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 8)  # the manifest's file size no longer holds
    target = {"t": torch.zeros(1000)}
    reader = Reader(root)
    dcp.load(target, storage_reader=reader)
    assert reader.step == 1 and torch.equal(target["t"], torch.full((1000,), 1.0))

    ckpt.save({"t": torch.full((1000,), 3.0)}, root, step=3)
    (data,) = (root / "step-000000003" / "data").iterdir()
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF  # same size, one bit pattern changed: only the checksum sees it
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointException) as caught:
        dcp.load(target, storage_reader=Reader(root, step=3))
    assert isinstance(caught.value.failures[0][0], ckpt.ChecksumMismatchError)


def test_second_writer_of_a_committed_step_is_refused(root: Path) -> None:
    model, _ = _trained(4)
    dcp.save({"model": model.state_dict()}, storage_writer=Writer(root, step=5))
    before = (root / "step-000000005" / "manifest.json").read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(CheckpointException) as caught:
        dcp.save({"model": model.state_dict()}, storage_writer=Writer(root, step=5))
    error = caught.value.failures[0][0]
    assert isinstance(error, ckpt.AlreadyCommittedError)
    assert "step 5" in str(error) and "never overwritten" in str(error)
    assert (root / "step-000000005" / "manifest.json").read_bytes() == before
    assert len(list((root / "step-000000005" / "data").iterdir())) == len(
        read_manifest(LocalBackend(root), 5).files
    )  # the refused save wrote nothing
    # Without a step the Writer takes the next one.
    dcp.save({"model": model.state_dict()}, storage_writer=Writer(root))
    assert committed_steps(LocalBackend(root)) == [6, 5]


class _Opaque:
    def __init__(self) -> None:
        self.x = 1


def test_value_that_needs_pickle_is_refused_by_name(root: Path) -> None:
    model, _ = _trained(5)
    state = {"model": model.state_dict(), "extra": {"epoch": 1, "sampler": _Opaque()}}
    with pytest.raises(CheckpointException) as caught:
        dcp.save(state, storage_writer=Writer(root))
    error = caught.value.failures[0][0]
    assert isinstance(error, ckpt.InvalidStateError)
    assert "extra.sampler" in str(error) and "no pickle" in str(error)
    assert not scan_steps(LocalBackend(root)).committed
    assert not any(p.is_file() for p in root.rglob("*"))  # refused before any write


def test_failing_write_commits_nothing_and_keeps_the_previous_step(root: Path) -> None:
    model, opt = _trained(6)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.save(state, storage_writer=Writer(root, step=1))
    backend = LocalBackend(root)
    faults = (FaultyBackend(backend, fail_write_at=2), FaultyBackend(backend, fail_put_at=1))
    for fault in faults:  # a data file; the manifest
        with pytest.raises(CheckpointException) as caught:
            dcp.save(state, storage_writer=Writer(fault))
        assert isinstance(caught.value.failures[0][0], ckpt.CheckpointError)
        assert fault.failures  # the fault did happen
        assert committed_steps(backend) == [1]
        assert not (root / "step-000000002" / "manifest.json").exists()
    verify_checkpoint(backend, read_manifest(backend, 1))
    # The same step saves fine once the storage works again.
    dcp.save(state, storage_writer=Writer(root, step=2))
    assert committed_steps(backend) == [2, 1]


def test_checkpoint_id_names_the_root(tmp_path: Path) -> None:
    model, _ = _trained(7)
    writer = Writer(tmp_path / "unused")
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "run", storage_writer=writer)
    assert committed_steps(LocalBackend(tmp_path / "run")) == [0]
    assert not (tmp_path / "unused").exists()
    assert Writer.validate_checkpoint_id("s3://bucket/run")
    assert Reader.validate_checkpoint_id(tmp_path / "run")
    assert not Reader.validate_checkpoint_id("gs://bucket/run")
    target = {"model": _fresh(8)[0].state_dict()}
    dcp.load(target, checkpoint_id=str(tmp_path / "run"), storage_reader=Reader("/nonexistent"))
    for name, value in model.state_dict().items():
        assert torch.equal(target["model"][name], value)


def test_writer_and_reader_through_s3(moto_s3: S3Server) -> None:
    backend: StorageBackend = moto_s3.backend()
    saved = _trained(9)
    state = {"model": saved[0].state_dict(), "optim": saved[1].state_dict(), "extra": EXTRA}
    dcp.save(state, storage_writer=Writer(backend))
    manifest = read_manifest(backend, 0)
    verify_checkpoint(backend, manifest)

    loaded = _fresh(10)
    ckpt.load({"model": loaded[0], "optim": loaded[1], "extra": {}}, backend)
    _assert_same_training_state(saved, loaded)
    again = _trained(11)
    target = {"model": again[0].state_dict(), "optim": again[1].state_dict(), "extra": {}}
    dcp.load(target, storage_reader=Reader(backend))
    again[1].load_state_dict(target["optim"])
    _assert_same_training_state(saved, again)


# --------------------------------------------------------------------------- gloo ranks

# name -> (global shape, dtype, placement): values are a function of the name.
SHARDED = {
    "w": ((7, 5), torch.float32, "S0"),  # uneven: 4+3 on 2 ranks, 3+3+1 on 3
    "emb": ((2, 3), torch.bfloat16, "S0"),  # fewer rows than 3 ranks: an empty shard
    "cols": ((3, 4), torch.float64, "S1"),
    "b": ((4,), torch.float32, "R"),
}
PLAIN = {"counts": ((3, 3), torch.int64)}  # a plain tensor: the same on every rank
META = {"epoch": 7, "name": "run", "lrs": [0.1, 0.01]}


def _value(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def _sharded_state(world: int, *, zero: bool, mesh: Any = None) -> dict[str, Any]:
    """Every tensor of the state as a DTensor on ``mesh`` (default: all ``world`` ranks;
    full tensors on one rank)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if mesh is None and world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    model: dict[str, Any] = {}
    for name, (shape, dtype, spec) in SHARDED.items():
        full = _value(name, shape, dtype)
        if zero:
            full = torch.zeros_like(full)
        placement = Replicate() if spec == "R" else Shard(int(spec[1:]))
        model[name] = full if mesh is None else distribute_tensor(full, mesh, [placement])
    for name, (shape, dtype) in PLAIN.items():
        model[name] = torch.zeros(shape, dtype=dtype) if zero else _value(name, shape, dtype)
    meta = {"epoch": 0, "name": "", "lrs": [0.0, 0.0]} if zero else dict(META)
    return {"model": model, "meta": meta}


def _mismatches(state: dict[str, Any]) -> list[str]:
    """Names whose loaded value differs from what was saved (collective on DTensors)."""
    wrong = []
    for name, value in state["model"].items():
        shape, dtype = (SHARDED.get(name) or PLAIN[name])[:2]
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if full.dtype != dtype or not torch.equal(full, _value(name, shape, dtype)):
            wrong.append(name)
    if state["meta"] != META:
        wrong.append(f"meta={state['meta']}")
    return wrong


def _save_on_ranks(
    rank: int, world: int, dcp_root: str, ckpt_root: str, group: Any = None, mesh: Any = None
) -> list[int]:
    """Save the state through the Writer (step 0, then step 1 with ``dcp.async_save``) and
    through ``ckpt.save`` (step 3), on the ranks of ``group`` (default: the world)."""
    from ckpt.coordination import ProcessGroupCoordinator

    state = _sharded_state(world, zero=False, mesh=mesh)
    dcp.save(state, storage_writer=Writer(dcp_root), process_group=group)
    coordinator = ProcessGroupCoordinator(group) if world > 1 else None
    ckpt.save(state, ckpt_root, step=3, coordinator=coordinator)
    pending = dcp.async_save(state, storage_writer=Writer(dcp_root), process_group=group)
    assert isinstance(pending, Future)
    pending.result()
    return committed_steps(LocalBackend(dcp_root))


def _save_on_2_load_on_3(rank: int, world: int, dcp_root: str, ckpt_root: str) -> Any:
    """Ranks 0 and 1 save as a job of two (their own process group and mesh); then all
    three ranks load. One launch of three processes serves both jobs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    pair = dist.new_group([0, 1])
    pair_mesh = DeviceMesh("cpu", [0, 1])  # every rank builds it; rank 2 is outside
    steps = None
    if rank < 2:
        steps = _save_on_ranks(rank, 2, dcp_root, ckpt_root, pair, pair_mesh)
    dist.barrier()
    return steps, _load_on_ranks(rank, world, dcp_root, ckpt_root)


def _load_on_ranks(rank: int, world: int, dcp_root: str, ckpt_root: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for label, root, step in (
        ("dcp0", dcp_root, 0),
        ("dcp1", dcp_root, None),
        ("ckpt", ckpt_root, None),
    ):
        target = _sharded_state(world, zero=True)
        dcp.load(target, storage_reader=Reader(root, step=step))
        found[f"Reader<-{label}"] = _mismatches(target)
    target = _sharded_state(world, zero=True)
    ckpt.load(target, dcp_root, step=0)
    found["ckpt.load<-dcp0"] = _mismatches(target)
    return found


CLEAN: dict[str, list[str]] = {
    k: [] for k in ("Reader<-dcp0", "Reader<-dcp1", "Reader<-ckpt", "ckpt.load<-dcp0")
}


def _load_here(dcp_root: Path, ckpt_root: Path) -> dict[str, Any]:
    return _load_on_ranks(0, 1, str(dcp_root), str(ckpt_root))


def test_dtensors_saved_on_2_ranks_load_on_1_and_3_both_ways(tmp_path: Path) -> None:
    dcp_root, ckpt_root = tmp_path / "dcp", tmp_path / "ckpt"
    results = run_ranks(_save_on_2_load_on_3, 3, str(dcp_root), str(ckpt_root))
    assert [steps for steps, _ in results] == [[1, 0], [1, 0], None]
    assert [loaded for _, loaded in results] == [CLEAN] * 3
    backend = LocalBackend(dcp_root)
    for step in (0, 1):
        manifest = read_manifest(backend, step)
        assert manifest.world_size == 2
        verify_checkpoint(backend, manifest)
        assert len(manifest.tensors["model.w"].pieces) == 2  # one per rank
        assert len(manifest.tensors["model.b"].pieces) == 1  # replicated: written once
        assert len(manifest.tensors["model.counts"].pieces) == 1
    assert read_manifest(backend, 0).state == read_manifest(LocalBackend(ckpt_root), 3).state
    assert _load_here(dcp_root, ckpt_root) == CLEAN


@pytest.mark.slow
@pytest.mark.parametrize(("save_world", "load_world"), [(3, 2), (3, 4), (4, 1), (1, 4)])
def test_dtensor_reshard_matrix(tmp_path: Path, save_world: int, load_world: int) -> None:
    dcp_root, ckpt_root = tmp_path / "dcp", tmp_path / "ckpt"
    if save_world == 1:
        _save_on_ranks(0, 1, str(dcp_root), str(ckpt_root))
    else:
        run_ranks(_save_on_ranks, save_world, str(dcp_root), str(ckpt_root))
    if load_world == 1:
        assert _load_here(dcp_root, ckpt_root) == CLEAN
    else:
        loaded = run_ranks(_load_on_ranks, load_world, str(dcp_root), str(ckpt_root))
        assert loaded == [CLEAN] * load_world


def test_reader_refuses_a_missing_step(root: Path) -> None:
    ckpt.save({"t": torch.ones(2)}, root, step=1)
    target = {"t": torch.zeros(2)}
    with pytest.raises(CheckpointException) as caught:
        dcp.load(target, storage_reader=Reader(root, step=2))
    assert "step 2 is not a committed checkpoint" in str(caught.value)
    assert torch.equal(target["t"], torch.zeros(2))


def _save_2d(rank: int, world: int, root: str) -> None:
    """HSDP-style on a 2x2 mesh: rows sharded over one dimension, replicated over the other."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = {
        name: distribute_tensor(_value(name, shape, dtype), mesh, [Replicate(), Shard(0)])
        for name, (shape, dtype, _) in SHARDED.items()
    }
    dcp.save({"model": model, "meta": dict(META)}, storage_writer=Writer(root))


@pytest.mark.slow
def test_2d_mesh_replicas_are_written_once(tmp_path: Path) -> None:
    run_ranks(_save_2d, 4, str(tmp_path))
    manifest = read_manifest(LocalBackend(tmp_path), 0)
    assert manifest.world_size == 4
    for name, (shape, _, _) in SHARDED.items():
        pieces = manifest.tensors[f"model.{name}"].pieces
        assert sum(p.box.numel for p in pieces) == torch.Size(shape).numel(), name
    target = {
        "model": {n: torch.zeros(s, dtype=d) for n, (s, d, _) in SHARDED.items()},
        "meta": {},
    }
    ckpt.load(target, tmp_path)
    for name, (shape, dtype, _) in SHARDED.items():
        assert torch.equal(target["model"][name], _value(name, shape, dtype)), name
    assert target["meta"] == META


def _stages_through_dcp(rank: int, world: int, root: str) -> dict[str, Any]:
    """Each rank a pipeline stage with its own layer, optimizer state and values."""
    weight = torch.full((3, 2), float(rank + 1))
    state = {
        "model": {f"layers.{rank}.weight": weight},
        "optim": {"state": {f"layers.{rank}.weight": {"exp_avg": weight * 2}}},
        "sched": {f"stage{rank}": {"microbatches": 4 + rank}},
        "step": 9,
    }
    dcp.save(state, storage_writer=Writer(root, step=1))
    target: dict[str, Any] = {
        "model": {f"layers.{rank}.weight": torch.zeros(3, 2)},
        "optim": {"state": {f"layers.{rank}.weight": {"exp_avg": torch.zeros(3, 2)}}},
        "sched": {f"stage{rank}": {}},
        "step": 0,
    }
    ckpt.load(target, root)
    return {
        "model": target["model"][f"layers.{rank}.weight"].tolist(),
        "moment": target["optim"]["state"][f"layers.{rank}.weight"]["exp_avg"].tolist(),
        "sched": target["sched"],
        "step": target["step"],
    }


def test_pipeline_stages_saved_through_dcp_load_strictly_on_each_stage(tmp_path: Path) -> None:
    results = run_ranks(_stages_through_dcp, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert result["model"] == [[rank + 1.0] * 2] * 3
        assert result["moment"] == [[2 * (rank + 1.0)] * 2] * 3
        assert result["sched"] == {f"stage{rank}": {"microbatches": 4 + rank}}
        assert result["step"] == 9
    manifest = read_manifest(LocalBackend(tmp_path), 1)
    assert set(manifest.partial_maps) == {("model",), ("optim", "state"), ("sched",)}


def test_ckpt_dcp_loads_on_first_use_after_a_plain_import_ckpt() -> None:
    script = (
        "import sys, ckpt\n"
        "print('torch.distributed.checkpoint' in sys.modules, 'dcp' in dir(ckpt))\n"
        "writer = ckpt.dcp.Writer\n"
        "print('torch.distributed.checkpoint' in sys.modules, writer.__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["False True", "True Writer"]
