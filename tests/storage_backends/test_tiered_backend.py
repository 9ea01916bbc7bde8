"""``TieredBackend`` passes the shared conformance suite, over a local remote tier and
over a real S3 remote tier (moto's server on loopback).

The suite sees the tiered backend as one ``StorageBackend``: writes and streams land on
the local tier, commits (``put_if_absent``) replicate in the background, reads fall
back from the local tier to the remote one, and deletes apply to both. No conformance
case needs a tiered exception. Beyond the suite: the ``Tiered`` capability, and the
byte-level view of a replicated directory once the local tier has lost it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_backends import LocalBackend, StorageBackend, TieredBackend, as_tiered
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3

from .conformance import BackendConformance, MiB, payload

__all__ = ["aws_test_env", "moto_s3"]  # fixtures used here

PART = 5 * MiB  # S3's smallest part size: streams of several MiB go multipart


class _TieredConformance(BackendConformance):
    """The suite, plus what only a tiered backend shows."""

    def test_declares_its_tiers(self, backend: StorageBackend) -> None:
        """The backend is ``Tiered``: its tiers, local first, and nothing pending."""
        assert isinstance(backend, TieredBackend)
        tiered = as_tiered(backend)
        assert tiered is backend
        assert tiered.tiers == (backend.local, backend.remote)
        assert tiered.unreplicated() == []
        assert tiered.retry_failed() == []

    def test_commit_replicates_its_directory_and_survives_local_loss(
        self, backend: StorageBackend
    ) -> None:
        """A commit copies its directory to the remote tier, commit object included; once
        the local tier loses it, every read, listing and commit check uses the remote."""
        assert isinstance(backend, TieredBackend)
        data = payload(3 * MiB + 1, seed=21)
        backend.write("step-1/data/r0", data)
        assert backend.put_if_absent("step-1/manifest.json", b"{}")
        backend.wait_replicated(timeout=60)
        assert backend.unreplicated() == []
        expected = ["step-1/data/r0", "step-1/manifest.json"]
        assert backend.remote.list_objects() == expected
        backend.local.delete_prefix("step-1")
        assert backend.read("step-1/data/r0") == data
        out = bytearray(1000)
        backend.read_into("step-1/data/r0", MiB, out)
        assert out == data[MiB : MiB + 1000]
        assert backend.size("step-1/data/r0") == len(data)
        assert backend.list_objects() == expected
        assert backend.list_prefixes() == ["step-1"]
        assert backend.put_if_absent("step-1/manifest.json", b"{}") is False
        backend.delete_prefix("step-1")
        assert backend.list_objects() == []
        assert backend.remote.list_objects() == []


class TestTieredLocalLocal(_TieredConformance):
    """Two local directories as the two tiers."""

    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return TieredBackend(LocalBackend(tmp_path / "local"), LocalBackend(tmp_path / "remote"))


class TestTieredLocalS3(_TieredConformance):
    """A local directory in front of a fresh S3 prefix (moto's server)."""

    @pytest.fixture
    def backend(self, tmp_path: Path, moto_s3: S3Server) -> Iterator[StorageBackend]:
        b = TieredBackend(LocalBackend(tmp_path / "local"), moto_s3.backend(part_size=PART))
        yield b
        b.close()
