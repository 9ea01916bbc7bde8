"""The embedded coordinator (no server): a single process, or the job's process group
with reports and the commit going through storage. Its index is the storage listing."""

from __future__ import annotations

import pytest

from ckpt._format import scan_steps
from storage_backends import StorageBackend
from tests.coordination.conformance import CoordinatorConformance
from tests.coordination.harness import CoordSpec


class TestEmbeddedConformance(CoordinatorConformance):
    """``LocalCoordinator`` in one process, ``ProcessGroupCoordinator`` across gloo ranks."""

    @pytest.fixture
    def spec(self) -> CoordSpec:
        return CoordSpec("embedded", timeout=5.0)

    def committed_index(self, spec: CoordSpec, backend: StorageBackend) -> list[int]:
        return sorted(scan_steps(backend).committed, reverse=True)
