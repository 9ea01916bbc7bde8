"""Checkpoints through ``s3://`` on real S3 servers on loopback (moto, SeaweedFS).

* ``ckpt.save`` / ``ckpt.load`` and ``CheckpointManager`` (retention included) through
  ``storage_backends.open_backend("s3://...", s3_config=S3Config(endpoint_url=...))``;
* 2 real gloo ranks save one sharded state to S3 and restore it bit for bit, and this
  process restores the same checkpoint as plain full tensors;
* a fault campaign: ~10 % of all requests get a transient fault of a mixed kind from the
  proxy (``tests/support/s3_proxy.py``) over several saves: every save commits, every restore is
  bit-identical, and after GC no multipart upload is left;
* a process SIGKILLed in the middle of a multipart upload leaves no committed torn step:
  restore returns the previous step, ``ckpt verify s3://...`` passes, and the next save of
  the same step commits and clears the orphaned upload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckpt
from ckpt import CheckpointManager, SaveOptions
from ckpt.format import read_manifest, scan_steps, step_prefix
from ckpt.retention import RetentionPolicy, apply_retention
from recovery import validate_files, verify_checkpoint
from storage_backends import S3Backend, S3Config, StorageBackend, open_backend
from tests.support.gloo import run_ranks
from tests.support.s3_proxy import TRANSIENT_FAULTS, S3FaultProxy
from tests.support.s3_servers import S3Server, aws_test_env, s3_server, seaweedfs_s3
from tests.support.workers import REPO_ROOT

__all__ = ["aws_test_env", "s3_server", "seaweedfs_s3"]  # fixtures used here

MiB = 1 << 20
PART = 5 * MiB
CHILD_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- helpers


def make_state(step: int) -> dict[str, Any]:
    """A state that differs per step: a tensor big enough for a multipart upload of two
    parts, small ones of several dtypes, and plain values."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "big": torch.randn(3 * MiB // 2 + 123, generator=g),  # 6 MiB of float32
        "small": torch.randn(4099, generator=g).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (513,), generator=g, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "meta": {"step": step, "note": f"state of step {step}"},
    }


def empty_like(state: dict[str, Any]) -> dict[str, Any]:
    """Zeros of the same shapes and dtypes, and empty plain values: a restore target."""
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {} for k, v in state.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (dtype, shape and every byte)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Every tensor bit-identical and every plain value equal."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert same_bits(got[key], value), f"{key!r} differs"
        else:
            assert got[key] == value, f"{key!r}: {got[key]!r} != {value!r}"


def s3_backend(
    server: S3Server, url: str, endpoint: str | None = None, **overrides: Any
) -> StorageBackend:
    """``open_backend("s3://...")`` with an ``S3Config`` for ``server`` (or a proxy)."""
    return open_backend(url, s3_config=server.config(endpoint, part_size=PART, **overrides))


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """A fresh checkpoint root ``s3://ckpt-test/<uuid>`` on each server in turn."""
    return s3_server.url()


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(s3_server: S3Server, s3_url: str) -> None:
    """``ckpt.save`` to ``s3://`` commits (manifest present, a multipart data file), and
    ``ckpt.load`` restores every tensor bit for bit; the newest of two steps by default."""
    backend = s3_backend(s3_server, s3_url)
    try:
        first, second = make_state(1), make_state(2)
        assert ckpt.save(first, backend, step=1).committed
        assert ckpt.save(second, backend, step=2).committed
        assert scan_steps(backend).committed == (1, 2)
        target = empty_like(second)
        assert ckpt.load(target, backend) == 2
        assert_same_state(target, second)
        target = empty_like(first)
        assert ckpt.load(target, backend, step=1) == 1
        assert_same_state(target, first)
        assert s3_server.unfinished_uploads(s3_url) == []
        assert verify_checkpoint(backend, read_manifest(backend, 2)).bytes_read > 6 * MiB
    finally:
        backend.close()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 512)
        self.b = nn.Linear(512, 2560)  # ~5 MiB of weights: one multipart data file


def _train(model: _Net, optim: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = model.b(torch.relu(model.a(torch.randn(8, 64, generator=g)))).square().mean()
    optim.zero_grad()
    loss.backward()
    optim.step()


def test_manager_saves_retains_and_restores(s3_server: S3Server, s3_url: str) -> None:
    """``CheckpointManager`` on ``s3://``: saves on its policy, keeps the last two steps
    (deleted steps vanish from listings, also on SeaweedFS), leaves no upload open, and
    a fresh manager restores model and optimizer bit for bit."""
    torch.manual_seed(0)
    model = _Net()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    backend = s3_backend(s3_server, s3_url)
    with CheckpointManager(
        backend, every_steps=2, keep_last=2, if_busy="wait", save_on_sigterm=False
    ) as mgr:
        assert mgr.restore({"model": model, "optim": optim}) is None
        for step in range(1, 7):
            _train(model, optim, step)
            mgr.maybe_save(step, {"model": model, "optim": optim, "meta": {"step": step}})
        mgr.wait()
    assert mgr.metrics.saves_committed == 3
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = optim.state_dict()

    check = s3_backend(s3_server, s3_url)
    try:
        assert scan_steps(check).committed == (4, 6)
        assert check.list_prefixes() == [step_prefix(4), step_prefix(6)]
        assert s3_server.unfinished_uploads(s3_url) == []
        torch.manual_seed(1)
        model2 = _Net()
        optim2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
        meta: dict[str, Any] = {}
        with CheckpointManager(check, every_steps=2, keep_last=2, save_on_sigterm=False) as mgr2:
            assert mgr2.restore({"model": model2, "optim": optim2, "meta": meta}) == 6
        assert meta == {"step": 6}
        for key, value in saved_model.items():
            assert same_bits(model2.state_dict()[key], value), key
        for pid, st in saved_optim["state"].items():
            for name, value in st.items():
                assert same_bits(optim2.state_dict()["state"][pid][name], value), (pid, name)
    finally:
        check.close()


def test_missing_bucket_is_a_clear_storage_error(s3_server: S3Server) -> None:
    """Saving to a bucket that does not exist fails with ``ckpt.StorageError`` naming the
    bucket and the fix, not retried into a long wait; nothing is committed anywhere."""
    backend = s3_backend(s3_server, "s3://ckpt-no-such-bucket-here/run")
    try:
        with pytest.raises(ckpt.StorageError) as info:
            ckpt.save(make_state(1), backend, step=1)
        message = str(info.value)
        assert "ckpt-no-such-bucket-here" in message and "create it or fix the URL" in message
        assert info.value.retryable is False
    finally:
        backend.close()


def test_access_denied_is_a_clear_storage_error_without_retries(
    s3_server: S3Server, s3_url: str
) -> None:
    """Every PUT answered 403 AccessDenied: the save fails with ``ckpt.StorageError``
    naming bucket, key and the fix; no request was repeated; no step is committed."""
    with S3FaultProxy(s3_server.endpoint) as proxy:
        backend = s3_backend(s3_server, s3_url, proxy.endpoint)
        try:
            proxy.add("access_denied", method="PUT")
            with pytest.raises(ckpt.StorageError) as info:
                ckpt.save(make_state(1), backend, step=1)
            proxy.clear()
            assert scan_steps(backend).committed == ()
        finally:
            backend.close()
    message = str(info.value)
    assert f"{s3_url}/{step_prefix(1)}/" in message
    assert "AccessDenied" in message and "check the credentials" in message
    assert info.value.retryable is False
    sent = [(r.method, r.target) for r in proxy.requests() if r.fault]
    assert sent and len(sent) == len(set(sent))


# --------------------------------------------------------------------------- 2 ranks

ROWS, COLS = 1024, 1536  # 6 MiB of float32: each rank's half is 3 MiB; with the bias
STEP = 11


def _global_weight() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(99))


def _rank_state(rank: int, world: int, *, zero: bool) -> dict[str, Any]:
    full = _global_weight()
    rows = ROWS // world
    local = full[rank * rows : (rank + 1) * rows].clone()
    bias = torch.arange(COLS, dtype=torch.float64) / 7
    return {
        "weight": ckpt.ShardedTensor(
            torch.zeros_like(local) if zero else local, (ROWS, COLS), (rank * rows, 0)
        ),
        "bias": torch.zeros_like(bias) if zero else bias,
        "meta": {} if zero else {"epoch": 3},
    }


def _rank_save_and_restore(rank: int, world: int, url: str, config: S3Config) -> dict[str, Any]:
    """One rank: save its shard to S3, then restore into zeros and compare bit for bit."""
    backend = S3Backend(url, config)
    try:
        state = _rank_state(rank, world, zero=False)
        result = ckpt.save(state, backend, step=STEP)
        target = _rank_state(rank, world, zero=True)
        loaded = ckpt.load(target, backend)
        return {
            "committed": result.committed,
            "loaded": loaded,
            "weight": same_bits(target["weight"].local, state["weight"].local),
            "bias": same_bits(target["bias"], state["bias"]),
            "meta": target["meta"],
        }
    finally:
        backend.close()


def test_two_ranks_save_and_restore_through_s3(seaweedfs_s3: S3Server) -> None:
    """2 gloo ranks save one sharded checkpoint to SeaweedFS and each restores its shard
    bit for bit; this process then restores the whole weight unsharded, bit for bit."""
    url = seaweedfs_s3.url()
    results = run_ranks(
        _rank_save_and_restore, 2, url, seaweedfs_s3.config(part_size=PART), timeout_s=120.0
    )
    for rank, r in enumerate(results):
        assert r == {
            "committed": True,
            "loaded": STEP,
            "weight": True,
            "bias": True,
            "meta": {"epoch": 3},
        }, rank
    backend = s3_backend(seaweedfs_s3, url)
    try:
        weight, bias = torch.zeros(ROWS, COLS), torch.zeros(COLS, dtype=torch.float64)
        assert ckpt.load({"weight": weight, "bias": bias, "meta": {}}, backend) == STEP
        assert same_bits(weight, _global_weight())
        assert same_bits(bias, torch.arange(COLS, dtype=torch.float64) / 7)
        manifest = read_manifest(backend, STEP)
        assert manifest.world_size == 2
        validate_files(backend, manifest)
        assert seaweedfs_s3.unfinished_uploads(url) == []
    finally:
        backend.close()


# --------------------------------------------------------------------------- fault campaign


def test_fault_campaign_through_proxy(s3_server: S3Server, s3_url: str, full: bool) -> None:
    """~10 % of requests (every kind of call) get a transient fault of a mixed kind:
    resets before and after the server acted, bodies cut or ending early, 503 SlowDown,
    500 InternalError. Every save commits, every retained step restores bit for bit
    (through the faults too), and after GC no multipart upload is left."""
    saves = 40 if full else 5
    with S3FaultProxy(s3_server.endpoint, seed=20240607) as proxy:
        backend = s3_backend(s3_server, s3_url, proxy.endpoint, max_concurrency=4)
        try:
            proxy.add(TRANSIENT_FAULTS, fraction=0.1, count=40 * saves)  # bounded
            states = {step: make_state(step) for step in range(1, saves + 1)}
            options = SaveOptions(file_bytes=4 * MiB)  # several data files per save
            with CheckpointManager(
                backend, keep_last=2, save_options=options, save_on_sigterm=False, manual=True
            ) as mgr:
                for step, state in states.items():
                    assert mgr.save(step, state, blocking=True).result().committed
            assert mgr.metrics.saves_committed == saves and mgr.metrics.saves_failed == 0
            retained = scan_steps(backend).committed
            assert retained == tuple(range(max(1, saves - 1), saves + 1))
            for step in retained:
                target = empty_like(states[step])
                assert ckpt.load(target, backend, step=step) == step
                assert_same_state(target, states[step])
            faults = Counter(r.fault for r in proxy.faults())
            methods = Counter(r.method for r in proxy.faults())
            proxy.clear()
            apply_retention(backend, RetentionPolicy(keep_last=1))
            backend.abort_unfinished("")
            assert scan_steps(backend).committed == (saves,)
            verify_checkpoint(backend, read_manifest(backend, saves))
        finally:
            backend.close()
    assert s3_server.unfinished_uploads(s3_url) == []
    total = len(proxy.requests())
    # Seeded, so these hold run after run; they show the campaign really injected a mix.
    assert sum(faults.values()) >= max(5, total // 25), (faults, total)
    assert len(faults) >= 3 and len(methods) >= 3, (faults, methods)


# --------------------------------------------------------------------------- kill -9


def child_main(url: str) -> None:
    """The SIGKILLed writer: commits step 1, waits for a line on stdin, saves step 2."""
    backend = open_backend(url, s3_config=S3Config(part_size=PART, addressing_style="path"))
    options = SaveOptions(file_bytes=1 * MiB)  # the small tensors land in their own files
    with CheckpointManager(
        backend, keep_last=5, save_options=options, save_on_sigterm=False, manual=True
    ) as mgr:
        mgr.save(1, make_state(1), blocking=True)
        print("committed 1", flush=True)
        sys.stdin.readline()
        mgr.save(2, make_state(2), blocking=True)
        print("committed 2", flush=True)


def child_env(server: S3Server, endpoint: str | None = None) -> dict[str, str]:
    """This environment without any AWS setting of the user's, plus the test server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **server.env(endpoint), "PYTHONPATH": str(REPO_ROOT)}


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or "" when it does not come in time."""
    out: list[str] = []
    reader = threading.Thread(
        target=lambda: out.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


def test_sigkill_mid_upload_leaves_no_torn_step(seaweedfs_s3: S3Server, tmp_path: Path) -> None:
    """A writer killed with SIGKILL while its multipart upload is in flight leaves step 2
    uncommitted: restore returns step 1 bit for bit, ``ckpt verify`` passes, and saving
    step 2 again commits it and aborts the dead writer's upload."""
    server = seaweedfs_s3
    url = server.url()
    with S3FaultProxy(server.endpoint) as proxy, open(tmp_path / "child.log", "w") as log:
        code = f"from tests.ckpt.test_s3_checkpoints import child_main; child_main({url!r})"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=child_env(server, proxy.endpoint),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            line = _readline(proc, CHILD_TIMEOUT_S)
            assert line.strip() == "committed 1", (
                line,
                (tmp_path / "child.log").read_text()[-3000:],
            )
            # Parts of step 2: the first goes through, the others hang until the kill.
            proxy.add("delay", count=1, method="PUT", target="partNumber=")
            proxy.add("stall", method="PUT", target="partNumber=", delay_s=60.0)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proxy.wait_for(lambda r: r.fault == "stall", CHILD_TIMEOUT_S)
            proc.kill()
            assert proc.wait(timeout=CHILD_TIMEOUT_S) == -9
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=CHILD_TIMEOUT_S)
    backend = s3_backend(server, url)
    try:
        listing = scan_steps(backend)
        assert listing.committed == (1,)
        assert len(server.unfinished_uploads(url)) >= 1  # the dead writer's upload
        target = empty_like(make_state(1))
        report = ckpt.restore(target, backend)
        assert report.step == 1 and report.skipped == ()
        assert_same_state(target, make_state(1))
        cli = Path(sys.executable).with_name("ckpt")
        argv = (
            [str(cli)]
            if cli.exists()
            else [sys.executable, "-c", "from ckpt.cli import main; main()"]
        )
        verify = subprocess.run(
            [*argv, "verify", url],
            env=child_env(server),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd=REPO_ROOT,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "step 1: OK" in verify.stdout
        # The job restarts and saves step 2 again: it commits over the torn prefix.
        with CheckpointManager(backend, keep_last=5, save_on_sigterm=False, manual=True) as mgr:
            assert mgr.save(2, make_state(2), blocking=True).result().committed
        assert scan_steps(backend).committed == (1, 2)
        assert server.unfinished_uploads(url) == []
        target = empty_like(make_state(2))
        assert ckpt.load(target, backend) == 2
        assert_same_state(target, make_state(2))
    finally:
        backend.close()
