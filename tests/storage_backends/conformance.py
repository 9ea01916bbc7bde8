"""One conformance suite for every storage backend.

Each backend's test class subclasses ``BackendConformance`` and overrides
``make_backend`` (or the ``backend`` fixture itself, when it needs other fixtures such
as a server). The suite checks only what ``storage_backends.StorageBackend`` promises,
never how a medium lays the bytes out, so an S3 backend reuses it unchanged.

Prefixes are "directories": ``list_objects("a")`` and ``delete_prefix("a")`` cover
``a/...`` and never ``ab/...``, whatever the medium's native notion of a prefix is.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage_backends import (
    BlobNotFoundError,
    BlobStream,
    BytesLike,
    InvalidPathError,
    StorageBackend,
    StorageBackendError,
    open_reader,
)

MiB = 1 << 20
INVALID_PATHS = ["../x", "/abs", "a//b", "", "a/../b", "a/..", "./a", "a/b/"]
INVALID_PREFIXES = ["../x", "a/../b", "a//b"]
# (offset, length) into the 1 MiB + 3 byte object of the ``ranged`` fixture.
RANGES = [(0, 1), (MiB + 2, 1), (12_345, 99_999), (0, MiB + 3), (MiB + 3, 0)]
RANGE_IDS = ["first-byte", "last-byte", "middle", "whole", "empty-at-end"]
# The object tree of the ``tree`` fixture: "ab" checks that prefixes match whole components.
TREE = ("a/1", "a/10", "a/2/x", "a/2/y/deep", "ab/z", "b")
# Modification times come from the medium's clock (S3: whole seconds).
CLOCK_SLACK_S = 2.0


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible pseudo-random bytes (no byte pattern hides an offset bug)."""
    return random.Random(seed).randbytes(size)


def write_buffers(backend: StorageBackend, path: str, buffers: Iterable[BytesLike]) -> None:
    """Write the concatenation of ``buffers`` as one object, as callers do: a stream."""
    stream = backend.open_stream(path)
    try:
        for buf in buffers:
            stream.write(buf)
        stream.commit()
    except BaseException:
        stream.abort()
        raise


def run_threads(count: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for ``i`` in ``range(count)`` on ``count`` threads that start together."""
    barrier = threading.Barrier(count)

    def task(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(task, range(count)))


class BackendConformance:
    """Behaviour every ``StorageBackend`` must show. Subclass it and override ``make_backend``."""

    # Reads racing with rewrites in test_replacement_is_atomic_for_readers; a backend
    # behind a network may lower it.
    race_reads: int = 1000
    # What an unfinished stream must have written to leave a trace on the medium.
    unfinished_bytes: int = 10_000

    def make_backend(self, tmp_path: Path) -> StorageBackend:
        """Return a fresh, empty backend private to one test."""
        raise NotImplementedError("subclasses return the backend under test")

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[StorageBackend]:
        """The backend under test, closed after the test."""
        b = self.make_backend(tmp_path)
        yield b
        b.close()

    # -- shape -------------------------------------------------------------------------

    def test_implements_protocol(self, backend: StorageBackend) -> None:
        """The backend satisfies the runtime-checkable protocol and names its root as a URL."""
        assert isinstance(backend, StorageBackend)
        assert isinstance(backend.url, str)
        assert "://" in backend.url
        assert backend.list_objects() == []

    # -- whole-object writes -----------------------------------------------------------

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (b"hello", b"hello"),
            (bytearray(b"\x00\x01\x02\xff"), b"\x00\x01\x02\xff"),
            (memoryview(b"0123456789")[2:7], b"23456"),
            (np.arange(6, dtype=np.float32), np.arange(6, dtype=np.float32).tobytes()),
            (np.arange(6, dtype=np.int16).reshape(2, 3), np.arange(6, dtype=np.int16).tobytes()),
            (b"", b""),
        ],
        ids=[
            "bytes",
            "bytearray",
            "memoryview-slice",
            "numpy",
            "numpy-2d",
            "empty",
        ],
    )
    def test_write_read_round_trip(
        self, backend: StorageBackend, data: Any, expected: bytes
    ) -> None:
        """Any buffer reads back byte for byte."""
        backend.write("obj/x.bin", data)
        assert backend.read("obj/x.bin") == expected
        assert backend.size("obj/x.bin") == len(expected)
        assert backend.exists("obj/x.bin")

    @pytest.mark.parametrize(
        ("buffers", "expected"),
        [
            ([b"ab", memoryview(b"cd"), bytearray(b"ef"), b""], b"abcdef"),
            ((b"x", b"yz"), b"xyz"),
            ([], b""),
        ],
        ids=["mixed", "tuple", "none"],
    )
    def test_buffers_streamed_as_one_object(
        self, backend: StorageBackend, buffers: Sequence[bytes], expected: bytes
    ) -> None:
        """Several buffers become one object through a stream (``write`` takes one
        buffer); a stream committed without any write is an empty object."""
        write_buffers(backend, "obj/x.bin", buffers)
        assert backend.read("obj/x.bin") == expected
        assert backend.size("obj/x.bin") == len(expected)

    def test_write_read_multi_mib(self, backend: StorageBackend) -> None:
        """Objects of several MiB (odd sizes, several buffers) survive the round trip."""
        first, second = payload(3 * MiB + 17, seed=1), payload(2 * MiB + 5, seed=2)
        backend.write("big/one.bin", first)
        write_buffers(backend, "big/two.bin", [first, memoryview(second)])
        assert backend.read("big/one.bin") == first
        assert backend.read("big/two.bin") == first + second
        assert backend.size("big/two.bin") == len(first) + len(second)

    def test_write_replaces_existing(self, backend: StorageBackend) -> None:
        """A second write replaces the whole object, leaving no tail of a longer old one."""
        backend.write("a/obj", payload(100_000, seed=3))
        backend.write("a/obj", b"short")
        assert backend.read("a/obj") == b"short"
        assert backend.size("a/obj") == 5
        assert backend.list_objects() == ["a/obj"]

    def test_replacement_is_atomic_for_readers(self, backend: StorageBackend) -> None:
        """A reader racing with rewrites always sees one whole version, never a mix or an error."""
        versions = [payload(64 * 1024, seed=4), payload(256 * 1024 + 3, seed=5)]
        backend.write("race/obj", versions[0])
        stop = threading.Event()
        seen: list[bytes] = []
        writer_errors: list[BaseException] = []

        def rewrite() -> None:
            i = 0
            try:
                while not stop.is_set():
                    i += 1
                    backend.write("race/obj", versions[i % 2])
            except BaseException as exc:
                writer_errors.append(exc)

        writer = threading.Thread(target=rewrite)
        writer.start()
        try:
            for _ in range(self.race_reads):
                seen.append(backend.read("race/obj"))
        finally:
            stop.set()
            writer.join()
        assert writer_errors == []
        assert all(s in versions for s in seen), "a read returned a mix of two versions"

    # -- streams -----------------------------------------------------------------------

    def test_stream_many_writes_then_commit(self, backend: StorageBackend) -> None:
        """Many appends of mixed sizes and buffer types commit to their exact concatenation."""
        rng = random.Random(6)
        chunks = [payload(rng.choice([0, 1, 7, 4096, 65_537]), seed=i) for i in range(120)]
        stream = backend.open_stream("s/data.bin")
        assert isinstance(stream, BlobStream)
        for i, chunk in enumerate(chunks):
            stream.write(memoryview(chunk) if i % 2 else chunk)
        stream.commit()
        expected = b"".join(chunks)
        assert backend.read("s/data.bin") == expected
        assert backend.size("s/data.bin") == len(expected)

    def test_stream_multi_mib(self, backend: StorageBackend) -> None:
        """A stream of several MiB in 1 MiB writes commits intact."""
        data = payload(5 * MiB + 123, seed=7)
        stream = backend.open_stream("s/big.bin")
        for start in range(0, len(data), MiB):
            stream.write(data[start : start + MiB])
        stream.commit()
        assert backend.read("s/big.bin") == data

    def test_stream_invisible_before_commit(self, backend: StorageBackend) -> None:
        """Until commit, a streamed object is neither listed, nor sized, nor readable."""
        stream = backend.open_stream("s/pending.bin")
        stream.write(payload(10_000, seed=8))
        assert not backend.exists("s/pending.bin")
        assert backend.list_objects() == []
        assert backend.list_objects("s") == []
        with pytest.raises(BlobNotFoundError):
            backend.size("s/pending.bin")
        with pytest.raises(BlobNotFoundError):
            backend.read("s/pending.bin")
        stream.commit()
        assert backend.list_objects() == ["s/pending.bin"]

    def test_stream_over_existing_keeps_old_until_commit(self, backend: StorageBackend) -> None:
        """Streaming to an existing path serves the old bytes until the new ones commit."""
        backend.write("s/obj", b"old")
        stream = backend.open_stream("s/obj")
        stream.write(b"new bytes")
        assert backend.read("s/obj") == b"old"
        stream.commit()
        assert backend.read("s/obj") == b"new bytes"

    def test_stream_abort_leaves_nothing(self, backend: StorageBackend) -> None:
        """Abort drops the data; a second abort is harmless; the stream is closed afterwards."""
        stream = backend.open_stream("s/dropped.bin")
        stream.write(payload(50_000, seed=9))
        stream.abort()
        stream.abort()
        assert not backend.exists("s/dropped.bin")
        assert backend.list_objects() == []
        with pytest.raises(StorageBackendError):
            stream.write(b"more")
        with pytest.raises(StorageBackendError):
            stream.commit()
        assert not backend.exists("s/dropped.bin")

    def test_stream_abort_keeps_old_object(self, backend: StorageBackend) -> None:
        """Aborting a stream to an existing path leaves the old object untouched."""
        old = payload(30_000, seed=10)
        backend.write("s/obj", old)
        stream = backend.open_stream("s/obj")
        stream.write(b"replacement that never lands")
        stream.abort()
        assert backend.read("s/obj") == old
        assert backend.list_objects() == ["s/obj"]

    def test_stream_is_closed_after_commit(self, backend: StorageBackend) -> None:
        """After commit, writes and a second commit fail, and abort does not undo the commit."""
        stream = backend.open_stream("s/done")
        stream.write(b"final")
        stream.commit()
        with pytest.raises(StorageBackendError):
            stream.write(b"late")
        with pytest.raises(StorageBackendError):
            stream.commit()
        stream.abort()
        assert backend.read("s/done") == b"final"

    def test_two_streams_same_path_one_wins_whole(self, backend: StorageBackend) -> None:
        """Two streams to one path, both committed, leave exactly one of the two versions."""
        versions = [payload(200_000, seed=11), payload(150_000, seed=12)]
        streams = [backend.open_stream("s/contested") for _ in versions]
        for stream, data in zip(streams, versions):
            stream.write(data[:1000])
        for stream, data in zip(streams, versions):
            stream.write(data[1000:])
        for stream in streams:
            stream.commit()
        assert backend.read("s/contested") in versions
        assert backend.list_objects() == ["s/contested"]

    # -- put_if_absent -----------------------------------------------------------------

    def test_put_if_absent_creates_once(self, backend: StorageBackend) -> None:
        """The first call creates the object; later calls return False and change nothing."""
        assert backend.put_if_absent("m/manifest.json", b'{"step": 1}') is True
        assert backend.put_if_absent("m/manifest.json", b'{"step": 2}') is False
        assert backend.read("m/manifest.json") == b'{"step": 1}'
        assert backend.list_objects() == ["m/manifest.json"]

    def test_put_if_absent_respects_written_object(self, backend: StorageBackend) -> None:
        """An object made by ``write`` also blocks ``put_if_absent``."""
        backend.write("m/obj", b"written")
        assert backend.put_if_absent("m/obj", b"put") is False
        assert backend.read("m/obj") == b"written"

    def test_put_if_absent_empty_object(self, backend: StorageBackend) -> None:
        """An empty object can be created and then blocks later puts."""
        assert backend.put_if_absent("m/empty", b"") is True
        assert backend.put_if_absent("m/empty", b"x") is False
        assert backend.read("m/empty") == b""

    def test_put_if_absent_concurrent_single_winner(self, backend: StorageBackend) -> None:
        """Of several committers racing for one path, exactly one wins and its bytes stay."""
        bodies = [f"committer {i}".encode() * 100 for i in range(8)]
        won = run_threads(8, lambda i: backend.put_if_absent("m/race.json", bodies[i]))
        assert sum(won) == 1
        assert backend.read("m/race.json") == bodies[won.index(True)]

    # -- ranged reads ------------------------------------------------------------------

    @pytest.fixture
    def ranged(self, backend: StorageBackend) -> bytes:
        """A 1 MiB + 3 byte object at ``r/obj``; returns its bytes."""
        data = payload(MiB + 3, seed=13)
        backend.write("r/obj", data)
        return data

    @pytest.mark.parametrize(("offset", "length"), RANGES, ids=RANGE_IDS)
    def test_read_range(
        self, backend: StorageBackend, ranged: bytes, offset: int, length: int
    ) -> None:
        """``read(path, offset, length)`` returns exactly that slice."""
        assert backend.read("r/obj", offset, length) == ranged[offset : offset + length]

    @pytest.mark.parametrize(("offset", "length"), RANGES, ids=RANGE_IDS)
    def test_read_into_range(
        self, backend: StorageBackend, ranged: bytes, offset: int, length: int
    ) -> None:
        """``read_into`` fills the whole buffer with the bytes at ``offset``."""
        out = bytearray(length)
        backend.read_into("r/obj", offset, out)
        assert out == ranged[offset : offset + length]

    def test_read_to_end(self, backend: StorageBackend, ranged: bytes) -> None:
        """With no length, ``read`` returns everything from ``offset`` on."""
        assert backend.read("r/obj", 1000) == ranged[1000:]
        assert backend.read("r/obj", len(ranged)) == b""

    def test_read_into_typed_and_sliced_buffers(
        self, backend: StorageBackend, ranged: bytes
    ) -> None:
        """``read_into`` accepts numpy arrays and writable memoryview slices."""
        floats = np.empty(1000, dtype=np.float32)
        # numpy stubs do not declare __buffer__, but arrays are buffers.
        backend.read_into("r/obj", 4000, floats)  # type: ignore[arg-type]
        assert floats.tobytes() == ranged[4000:8000]
        whole = bytearray(100)
        backend.read_into("r/obj", 50, memoryview(whole)[10:60])
        assert whole[10:60] == ranged[50:100]
        assert whole[:10] == bytes(10) and whole[60:] == bytes(40)

    def test_reader_reads_ranges_of_one_version(
        self, backend: StorageBackend, ranged: bytes
    ) -> None:
        """``open_reader`` (the loader's ranged reads, on any backend) fills buffers like
        ``read_into`` and raises the same errors past the end; closing twice is fine."""
        reader = open_reader(backend, "r/obj")
        try:
            for offset, length in RANGES:
                out = bytearray(length)
                reader.read_into(offset, out)
                assert out == ranged[offset : offset + length]
            with pytest.raises(StorageBackendError) as info:
                reader.read_into(len(ranged) - 5, bytearray(6))
            assert not isinstance(info.value, BlobNotFoundError)
        finally:
            reader.close()
            reader.close()

    def test_reader_of_missing_object_raises_not_found(self, backend: StorageBackend) -> None:
        """A reader of nothing raises ``BlobNotFoundError`` at the latest on its first read."""
        with pytest.raises(BlobNotFoundError):
            reader = open_reader(backend, "r/none")
            try:
                reader.read_into(0, bytearray(1))
            finally:
                reader.close()

    @pytest.mark.parametrize(
        "call",
        [
            lambda b, n: b.read("r/obj", n - 1, 2),
            lambda b, n: b.read("r/obj", n + 10, 1),
            lambda b, n: b.read("r/obj", n + 10),
            lambda b, n: b.read_into("r/obj", n - 5, bytearray(6)),
            lambda b, n: b.read_into("r/obj", n, bytearray(1)),
        ],
        ids=[
            "read-straddles-end",
            "read-after-end",
            "read-to-end-from-after-end",
            "read_into-straddles-end",
            "read_into-at-end",
        ],
    )
    def test_read_past_end_raises(
        self, backend: StorageBackend, ranged: bytes, call: Callable[[StorageBackend, int], Any]
    ) -> None:
        """Reading beyond the last byte is an error of the backend's own type, not a short read."""
        with pytest.raises(StorageBackendError) as info:
            call(backend, len(ranged))
        assert not isinstance(info.value, BlobNotFoundError)
        assert info.value.retryable is False

    # -- size, exists, missing ---------------------------------------------------------

    def test_size_and_exists(self, backend: StorageBackend) -> None:
        """``size`` is the byte count (0 when empty); ``exists`` says yes only for objects."""
        backend.write("z/empty", b"")
        backend.write("z/seven", b"1234567")
        assert backend.size("z/empty") == 0
        assert backend.size("z/seven") == 7
        assert backend.exists("z/empty") and backend.exists("z/seven")
        assert not backend.exists("z/none")
        assert not backend.exists("nowhere/none")

    @pytest.mark.parametrize(
        "call",
        [
            lambda b, p: b.read(p),
            lambda b, p: b.read(p, 3, 4),
            lambda b, p: b.read_into(p, 0, bytearray(4)),
            lambda b, p: b.read_into(p, 0, bytearray(0)),
            lambda b, p: b.size(p),
        ],
        ids=["read", "read-range", "read_into", "read_into-empty", "size"],
    )
    @pytest.mark.parametrize("path", ["missing", "dir/missing", "dir", "dir/obj/below"])
    def test_missing_object_raises_not_found(
        self, backend: StorageBackend, call: Callable[[StorageBackend, str], Any], path: str
    ) -> None:
        """Reads and ``size`` of anything that is not an object (absent, a prefix, below an
        object) raise ``BlobNotFoundError`` naming the path."""
        backend.write("dir/obj", b"payload")
        with pytest.raises(BlobNotFoundError) as info:
            call(backend, path)
        assert info.value.path == path
        assert not backend.exists(path)

    # -- listing -----------------------------------------------------------------------

    @pytest.fixture
    def tree(self, backend: StorageBackend) -> list[str]:
        """Writes ``TREE`` (in shuffled order) and returns it sorted."""
        for path in random.Random(14).sample(TREE, len(TREE)):
            backend.write(path, path.encode())
        return sorted(TREE)

    def test_list_objects_recursive_sorted(self, backend: StorageBackend, tree: list[str]) -> None:
        """``list_objects`` returns full paths under a prefix, recursively, sorted."""
        assert backend.list_objects() == tree
        assert backend.list_objects("") == tree
        assert backend.list_objects("a") == ["a/1", "a/10", "a/2/x", "a/2/y/deep"]
        assert backend.list_objects("a/") == ["a/1", "a/10", "a/2/x", "a/2/y/deep"]
        assert backend.list_objects("a/2") == ["a/2/x", "a/2/y/deep"]

    def test_list_objects_prefix_is_a_directory(
        self, backend: StorageBackend, tree: list[str]
    ) -> None:
        """A prefix matches whole path components; missing prefixes and objects list nothing."""
        assert "ab/z" not in backend.list_objects("a")
        assert backend.list_objects("a/1") == []
        assert backend.list_objects("missing") == []
        assert backend.list_objects("b") == []

    def test_list_objects_excludes_unfinished_streams(self, backend: StorageBackend) -> None:
        """Open and aborted streams never show in listings, beside or below finished objects."""
        backend.write("step-1/data/done", b"x")
        open_ = backend.open_stream("step-1/data/open")
        open_.write(b"partial")
        fresh = backend.open_stream("step-2/data/open")
        fresh.write(b"partial")
        aborted = backend.open_stream("step-1/data/aborted")
        aborted.write(b"partial")
        aborted.abort()
        assert backend.list_objects() == ["step-1/data/done"]
        assert backend.list_objects("step-1") == ["step-1/data/done"]
        assert backend.list_objects("step-2") == []
        open_.abort()
        fresh.abort()

    def test_list_prefixes_immediate_children(
        self, backend: StorageBackend, tree: list[str]
    ) -> None:
        """``list_prefixes`` gives the names of the immediate child prefixes, sorted."""
        assert backend.list_prefixes() == ["a", "ab"]
        assert backend.list_prefixes("") == ["a", "ab"]
        assert backend.list_prefixes("a") == ["2"]
        assert backend.list_prefixes("a/") == ["2"]
        assert backend.list_prefixes("a/2") == ["y"]
        assert backend.list_prefixes("a/2/y") == []
        assert backend.list_prefixes("missing") == []
        assert backend.list_prefixes("b") == []

    # -- deletion ----------------------------------------------------------------------

    def test_delete_ignores_missing(self, backend: StorageBackend, tree: list[str]) -> None:
        """``delete`` removes the named objects and silently skips paths that are not objects
        (absent, below an object, or a prefix, whose objects stay)."""
        backend.delete(["a/1", "missing", "a/nope/x", "b/below-an-object", "a/2"])
        backend.delete(p for p in ["b"])
        backend.delete([])
        assert backend.list_objects() == ["a/10", "a/2/x", "a/2/y/deep", "ab/z"]
        assert not backend.exists("a/1")

    def test_delete_prefix_removes_everything_below(self, backend: StorageBackend) -> None:
        """``delete_prefix`` removes finished and unfinished objects of one prefix, and only it."""
        for path in [
            "step-1/manifest.json",
            "step-1/data/r0",
            "step-1/data/sub/r1",
            "step-10/data/r0",
        ]:
            backend.write(path, path.encode())
        unfinished = backend.open_stream("step-1/data/r2")
        unfinished.write(payload(20_000, seed=15))
        backend.delete_prefix("step-1")
        unfinished.abort()
        assert backend.list_objects("step-1") == []
        assert backend.list_objects() == ["step-10/data/r0"]
        assert backend.list_prefixes() == ["step-10"]
        assert backend.read("step-10/data/r0") == b"step-10/data/r0"
        backend.write("step-1/data/r0", b"again")
        assert backend.list_objects("step-1") == ["step-1/data/r0"]

    def test_abort_unfinished_drops_dead_streams_only(self, backend: StorageBackend) -> None:
        """Streams a dead writer left open are dropped; committed objects and young streams stay."""
        backend.write("step-1/data/done", b"done")
        dead = backend.open_stream("step-1/data/dead")
        dead.write(payload(10_000, seed=16))
        assert backend.abort_unfinished("step-1", older_than_seconds=3600) == 0
        assert backend.abort_unfinished("step-1") == 1
        assert backend.abort_unfinished("step-1") == 0
        assert backend.list_objects("step-1") == ["step-1/data/done"]
        assert backend.read("step-1/data/done") == b"done"
        dead.abort()  # the writer's own abort after the fact is harmless

    def test_last_modified_of_objects_prefixes_and_unfinished_writes(
        self, backend: StorageBackend
    ) -> None:
        """``last_modified`` covers the object itself, everything under a prefix (not
        ``ab/`` for ``a``) and unfinished writes; None where nothing is."""
        assert backend.last_modified("step-1") is None
        before = time.time() - CLOCK_SLACK_S
        backend.write("step-1/data/done", b"done")
        backend.write("step-10/x", b"other")
        for where in ("step-1", "step-1/data", "step-1/data/done"):
            found = backend.last_modified(where)
            assert found is not None and before <= found <= time.time() + CLOCK_SLACK_S, where
        assert backend.last_modified("step-1/data/none") is None
        unfinished = backend.open_stream("step-2/data/big")
        unfinished.write(payload(self.unfinished_bytes, seed=17))
        try:
            assert backend.last_modified("step-2") is not None
        finally:
            unfinished.abort()

    def test_delete_prefix_missing_is_a_no_op(self, backend: StorageBackend) -> None:
        """Deleting a prefix that holds nothing succeeds and touches nothing else."""
        backend.write("keep/obj", b"k")
        backend.delete_prefix("nothing-here")
        backend.delete_prefix("keep/obj/below")
        assert backend.list_objects() == ["keep/obj"]

    def test_delete_prefix_refuses_root(self, backend: StorageBackend) -> None:
        """An empty prefix would wipe the whole root: it is refused and nothing is deleted."""
        backend.write("keep/obj", b"k")
        for prefix in ["", "/"]:
            with pytest.raises(InvalidPathError):
                backend.delete_prefix(prefix)
        assert backend.list_objects() == ["keep/obj"]

    # -- invalid paths -----------------------------------------------------------------

    @pytest.mark.parametrize(
        "call",
        [
            lambda b, p: b.write(p, b"x"),
            lambda b, p: b.open_stream(p),
            lambda b, p: b.put_if_absent(p, b"x"),
            lambda b, p: b.read(p),
            lambda b, p: b.read_into(p, 0, bytearray(1)),
            lambda b, p: b.size(p),
            lambda b, p: b.exists(p),
            lambda b, p: b.delete([p]),
        ],
        ids=[
            "write",
            "open_stream",
            "put_if_absent",
            "read",
            "read_into",
            "size",
            "exists",
            "delete",
        ],
    )
    @pytest.mark.parametrize("path", INVALID_PATHS)
    def test_invalid_object_path(
        self, backend: StorageBackend, call: Callable[[StorageBackend, str], Any], path: str
    ) -> None:
        """Malformed paths, and paths that would leave the root, raise ``InvalidPathError``."""
        with pytest.raises(InvalidPathError):
            call(backend, path)
        assert backend.list_objects() == []

    @pytest.mark.parametrize(
        "call",
        [
            lambda b, p: b.list_objects(p),
            lambda b, p: b.list_prefixes(p),
            lambda b, p: b.delete_prefix(p),
        ],
        ids=["list_objects", "list_prefixes", "delete_prefix"],
    )
    @pytest.mark.parametrize("prefix", INVALID_PREFIXES)
    def test_invalid_prefix(
        self, backend: StorageBackend, call: Callable[[StorageBackend, str], Any], prefix: str
    ) -> None:
        """Prefixes with ``..`` or empty components raise ``InvalidPathError``."""
        backend.write("keep/obj", b"k")
        with pytest.raises(InvalidPathError):
            call(backend, prefix)
        assert backend.list_objects() == ["keep/obj"]

    # -- concurrency -------------------------------------------------------------------

    def test_concurrent_writes_of_different_paths(self, backend: StorageBackend) -> None:
        """Threads writing different objects (sharing new prefixes) all land intact."""
        threads, per_thread = 6, 8

        def work(t: int) -> None:
            for j in range(per_thread):
                data = payload(10_000 + 997 * j, seed=100 * t + j)
                path = f"conc/shared-{j % 2}/t{t}/o{j}"
                if j % 2:
                    backend.write(path, data)
                else:
                    stream = backend.open_stream(path)
                    stream.write(data[:5000])
                    stream.write(data[5000:])
                    stream.commit()

        run_threads(threads, work)
        expected = sorted(
            f"conc/shared-{j % 2}/t{t}/o{j}" for t in range(threads) for j in range(per_thread)
        )
        assert backend.list_objects("conc") == expected
        for t in range(threads):
            for j in range(per_thread):
                path = f"conc/shared-{j % 2}/t{t}/o{j}"
                assert backend.read(path) == payload(10_000 + 997 * j, seed=100 * t + j)

    def test_concurrent_read_into(self, backend: StorageBackend) -> None:
        """Threads reading many ranges of one object at once each get their exact bytes."""
        data = payload(2 * MiB, seed=16)
        backend.write("conc/read", data)

        def work(t: int) -> bool:
            rng = random.Random(t)
            for _ in range(40):
                offset = rng.randrange(len(data))
                out = bytearray(rng.randrange(1, min(200_000, len(data) - offset) + 1))
                backend.read_into("conc/read", offset, out)
                if out != data[offset : offset + len(out)]:
                    return False
            return True

        assert all(run_threads(6, work))
