"""The S3 backend against real S3 servers on loopback: moto's server mode and SeaweedFS.

Both are reached through boto3 over HTTP exactly as AWS is (``tests/support/s3_servers.py``);
faults are injected between client and server by a loopback proxy
(``tests/support/s3_proxy.py``), never by mocking boto3. Every backend has retries that do not
sleep (``RetryPolicy(sleep=no_wait)``), so that a test never waits on backoff.

* ``TestS3Moto`` / ``TestS3SeaweedFS``: the shared conformance suite, each test under a
  fresh ``s3://ckpt-test/<uuid>`` prefix, with 5 MiB parts so that streams of several
  MiB really go multipart.
* What only S3 shows, on both servers: multipart with several parts in flight, the
  conditional-put commit and its fallback, retries of transient faults, clear
  non-retryable errors, aborting orphaned uploads, ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from storage_backends import (
    BlobNotFoundError,
    RetryPolicy,
    S3Backend,
    StorageBackend,
    StorageBackendError,
    open_backend,
)
from tests.support.s3_proxy import S3FaultProxy
from tests.support.s3_servers import (
    S3Server,
    aws_test_env,
    base_env,
    moto_s3,
    no_wait,
    s3_server,
    seaweedfs_s3,
)

from .conformance import BackendConformance, payload, run_threads

__all__ = ["aws_test_env", "moto_s3", "s3_server", "seaweedfs_s3"]  # fixtures used here

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part size


class _S3Conformance(BackendConformance):
    """The conformance suite on one S3 server; subclasses name the server fixture."""

    server_fixture = ""
    # False where the server reports a made-up start time for every multipart upload.
    real_upload_times = True
    # Each read is an HTTP round trip; a hundred still race with the rewrites.
    race_reads = 100
    # A stream keeps its first part in memory until a whole part has gone out.
    unfinished_bytes = PART + 10_000

    @pytest.fixture
    def backend(self, request: pytest.FixtureRequest) -> Iterator[StorageBackend]:
        """A backend under a fresh prefix of the session's server, with 5 MiB parts."""
        server: S3Server = request.getfixturevalue(self.server_fixture)
        b = server.backend(part_size=PART)
        yield b
        b.close()

    def test_abort_unfinished_drops_dead_streams_only(self, backend: StorageBackend) -> None:
        """Uploads a dead writer left open are aborted; committed objects and young uploads stay.

        Replaces the shared test: an S3 stream holds its first part in the writer's
        memory (a dead writer leaves nothing on the server) until a whole part has
        gone out, so the dead stream here writes more than one part.
        """
        backend.write("step-1/data/done", b"done")
        dead = backend.open_stream("step-1/data/dead")
        dead.write(payload(PART + 10_000, seed=16))
        if self.real_upload_times:
            assert backend.abort_unfinished("step-1", older_than_seconds=3600) == 0
        assert backend.abort_unfinished("step-1") == 1
        assert backend.abort_unfinished("step-1") == 0
        assert backend.list_objects("step-1") == ["step-1/data/done"]
        assert backend.read("step-1/data/done") == b"done"
        dead.abort()  # the writer's own abort after the fact is harmless


class TestS3Moto(_S3Conformance):
    """``S3Backend`` on moto's S3 server passes the conformance suite."""

    server_fixture = "moto_s3"
    real_upload_times = False  # moto lists every upload as started on 2010-11-10


class TestS3SeaweedFS(_S3Conformance):
    """``S3Backend`` on SeaweedFS passes the conformance suite."""

    server_fixture = "seaweedfs_s3"


# --------------------------------------------------------------------------- S3 only


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3FaultProxy]:
    """A fault proxy in front of the server (no rules yet)."""
    with S3FaultProxy(s3_server.endpoint, seed=1234) as p:
        yield p


@pytest.fixture
def via_proxy(s3_server: S3Server, proxy: S3FaultProxy) -> Iterator[S3Backend]:
    """A backend under a fresh prefix that reaches the server through ``proxy``."""
    b = s3_server.backend(endpoint=proxy.endpoint, part_size=PART, max_concurrency=3)
    yield b
    b.close()


def _uploads(server: S3Server, backend: S3Backend) -> list[dict[str, Any]]:
    return server.unfinished_uploads(backend.url)


def test_multipart_several_parts_in_flight_odd_writes(
    s3_server: S3Server, proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """Odd-sized writes of ~28 MiB go out as 5 MiB parts: while the server holds them,
    exactly ``max_concurrency`` (3) parts are in flight and the writer waits (bounded
    memory); released, the stream commits the exact concatenation as a real multipart
    object of ceil(size / part) parts, and no upload is left open."""
    sizes = [1, 1_234_567, 777, 3 * MiB + 1, 6 * MiB + 11, 4093, 5 * MiB, 7 * MiB - 3, 13, 5 * MiB]
    chunks = [payload(n, seed=i) for i, n in enumerate(sizes)]
    data = b"".join(chunks)
    proxy.add("hold", method="PUT", target="partNumber=", delay_s=60.0)
    stream = via_proxy.open_stream("mp/odd.bin")

    def feed() -> None:
        for i, chunk in enumerate(chunks):
            stream.write(memoryview(chunk) if i % 2 else bytearray(chunk))

    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(feed)
        try:
            assert proxy.wait_in_flight(3, timeout=60)
            assert not writer.done()  # blocked: no slot for a fourth part
        finally:
            proxy.release()
        writer.result(timeout=60)
    stream.commit()
    parts = math.ceil(len(data) / PART)
    assert parts >= 5
    assert len(proxy.requests("PUT", "partNumber=")) == parts
    assert proxy.max_in_flight == via_proxy.config.max_concurrency
    assert via_proxy.read("mp/odd.bin") == data
    head = s3_server.client().head_object(
        Bucket=s3_server.bucket, Key=via_proxy._s3.key("mp/odd.bin")
    )
    assert head["ContentLength"] == len(data)
    assert str(head["ETag"]).strip('"').endswith(f"-{parts}")
    assert _uploads(s3_server, via_proxy) == []


def test_write_above_part_size_goes_multipart(
    s3_server: S3Server, proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """``write`` of a buffer bigger than one part streams it as a multipart upload (no
    single PUT above ``part_size``) and reads back intact."""
    data = payload(7 * MiB + 22, seed=1)
    via_proxy.write("mp/big.bin", data)
    assert via_proxy.read("mp/big.bin") == data
    assert len(proxy.requests("PUT", "partNumber=")) == 2
    assert not [r for r in proxy.requests("PUT") if "partNumber=" not in r.target]


def test_put_if_absent_uses_if_none_match(proxy: S3FaultProxy, via_proxy: S3Backend) -> None:
    """On a server that honours ``If-None-Match: *`` (both do), the commit is one
    conditional PUT, found out by a probe that leaves nothing behind."""
    assert via_proxy.put_if_absent("c/manifest.json", b"one") is True
    assert via_proxy.put_if_absent("c/manifest.json", b"two") is False
    assert via_proxy.read("c/manifest.json") == b"one"
    puts = [r for r in proxy.requests("PUT") if "manifest.json" in r.target]
    assert len(puts) == 2 and all(r.headers.get("if-none-match") == "*" for r in puts)
    assert via_proxy.list_objects() == ["c/manifest.json"]
    assert via_proxy.list_prefixes() == ["c"]


def test_put_if_absent_race_single_winner_despite_lost_answers(
    s3_server: S3Server, proxy: S3FaultProxy
) -> None:
    """8 threads race for one manifest while some answers are lost after the server
    acted (the retry then meets 412): exactly one caller wins and its bytes stay."""
    backend = s3_server.backend(endpoint=proxy.endpoint, conditional_put="on")
    try:
        proxy.add(["reset_after", "reset", "slowdown"], fraction=0.4, count=6, method="PUT")
        bodies = [f"committer {i}".encode() * 50 for i in range(8)]
        won = run_threads(8, lambda i: backend.put_if_absent("race/manifest.json", bodies[i]))
        assert sum(won) == 1
        assert backend.read("race/manifest.json") == bodies[won.index(True)]
    finally:
        backend.close()


def test_put_if_absent_lost_answer_is_still_a_win(
    proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """The conditional PUT succeeds on the server but the answer is lost: the retry gets
    412, sees its own bytes, and reports the win (retries are idempotent)."""
    via_proxy.put_if_absent("warm/x", b"probe the server first")
    proxy.fail_next("reset_after", method="PUT", target="/lost/")
    assert via_proxy.put_if_absent("lost/manifest.json", b"mine") is True
    assert len(proxy.requests("PUT", "/lost/")) == 2
    assert via_proxy.put_if_absent("lost/manifest.json", b"other") is False
    assert via_proxy.read("lost/manifest.json") == b"mine"


def test_conditional_put_off_uses_check_then_put(s3_server: S3Server, proxy: S3FaultProxy) -> None:
    """``conditional_put="off"`` never sends ``If-None-Match`` and still creates once."""
    backend = s3_server.backend(endpoint=proxy.endpoint, conditional_put="off")
    try:
        assert backend.put_if_absent("off/manifest.json", b"first") is True
        assert backend.put_if_absent("off/manifest.json", b"second") is False
        backend.write("off/other", b"written")
        assert backend.put_if_absent("off/other", b"put") is False
        assert backend.read("off/manifest.json") == b"first"
        assert backend.read("off/other") == b"written"
        assert all("if-none-match" not in r.headers for r in proxy.requests("PUT"))
        assert proxy.requests("HEAD", "off/manifest.json")  # the check before the put
    finally:
        backend.close()


def test_auto_detects_server_ignoring_if_none_match(
    moto_s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """``conditional_put="auto"`` probes once; behind a proxy that drops the header (a
    server that ignores it) it falls back to check-then-put, warns, and stays correct.

    moto only: SeaweedFS checks signatures, and the header is signed.
    """
    with S3FaultProxy(moto_s3.endpoint, strip_headers=["if-none-match"]) as stripping:
        backend = moto_s3.backend(endpoint=stripping.endpoint)
        try:
            with caplog.at_level(logging.WARNING, logger="storage_backends"):
                assert backend.put_if_absent("auto/manifest.json", b"first") is True
            assert backend.put_if_absent("auto/manifest.json", b"second") is False
            assert backend.read("auto/manifest.json") == b"first"
            assert "ignores If-None-Match" in caplog.text
            assert backend.list_objects() == ["auto/manifest.json"]  # the probe is gone
            probes = [r for r in stripping.requests("PUT") if ".ckpt-probe" in r.target]
            assert len(probes) == 2  # one probe, once per backend
        finally:
            backend.close()


def test_probe_survives_a_lost_answer(proxy: S3FaultProxy, via_proxy: S3Backend) -> None:
    """The probe's first PUT lands but its answer is lost; the retry's 412 is the proof
    that the server honours ``If-None-Match``: conditional commits stay on."""
    proxy.fail_next("reset_after", method="PUT", target=".ckpt-probe")
    assert via_proxy.put_if_absent("p/manifest.json", b"one") is True
    assert via_proxy._conditional is True
    assert proxy.requests("PUT", "p/manifest.json")[0].headers.get("if-none-match") == "*"
    assert via_proxy.put_if_absent("p/manifest.json", b"two") is False


def test_probe_failure_is_no_verdict(proxy: S3FaultProxy, via_proxy: S3Backend) -> None:
    """A probe that fails for another reason (here AccessDenied on its second PUT) fails
    the call instead of switching conditional commits off for good; the next call probes
    again and commits with ``If-None-Match``."""
    proxy.add("delay", count=1, method="PUT", target=".ckpt-probe")  # the first passes
    proxy.add("access_denied", count=1, method="PUT", target=".ckpt-probe")
    with pytest.raises(StorageBackendError, match="AccessDenied"):
        via_proxy.put_if_absent("p/manifest.json", b"one")
    assert via_proxy._conditional is None
    assert not via_proxy.exists("p/manifest.json")
    assert via_proxy.put_if_absent("p/manifest.json", b"one") is True
    assert via_proxy._conditional is True
    assert via_proxy.list_objects() == ["p/manifest.json"]


# -- retries -------------------------------------------------------------------------------

TRANSIENT = ["slowdown", "internal", "reset", "reset_after", "reset_body", "short_body"]


@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_faults_on_put_are_retried(
    proxy: S3FaultProxy, via_proxy: S3Backend, kind: str
) -> None:
    """Two PUTs in a row fail with ``kind``; the third lands; the bytes are right."""
    data = payload(100_000, seed=1)
    proxy.fail_next(kind, 2, method="PUT")
    via_proxy.write("retry/obj", data)
    assert len(proxy.requests("PUT", "retry/obj")) == 3
    assert via_proxy.read("retry/obj") == data


@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_faults_on_ranged_get_are_retried(
    proxy: S3FaultProxy, via_proxy: S3Backend, kind: str
) -> None:
    """Ranged GETs failing with ``kind`` (bodies cut or ending early included) are
    retried; the buffer ends up exact."""
    data = payload(3 * MiB + 7, seed=2)
    via_proxy.write("retry/ranged", data)
    proxy.fail_next(kind, 2, method="GET", target="retry/ranged")
    out = bytearray(2 * MiB + 1)
    via_proxy.read_into("retry/ranged", 12345, out)
    assert out == data[12345 : 12345 + len(out)]
    assert len(proxy.requests("GET", "retry/ranged")) == 3


def test_cut_body_resumes_where_it_stopped(proxy: S3FaultProxy, via_proxy: S3Backend) -> None:
    """After a body cut halfway, the retry asks only for the missing bytes, of the same
    version of the object (``If-Match``)."""
    data = payload(2 * MiB, seed=3)
    via_proxy.write("resume/obj", data)
    proxy.fail_next("short_body", method="GET", target="resume/obj")
    out = bytearray(len(data) - 100)
    via_proxy.read_into("resume/obj", 100, out)
    assert out == data[100:]
    first, second = proxy.requests("GET", "resume/obj")
    assert first.headers["range"] == f"bytes=100-{len(data) - 1}"
    start = int(second.headers["range"].removeprefix("bytes=").split("-")[0])
    assert 100 < start < len(data) and second.headers.get("if-match")


def test_resume_after_replacement_starts_over(
    s3_server: S3Server, proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """The object is replaced while a cut body is being read: the resumed GET is refused
    (``If-Match``), and the read starts over on the new version, never mixing the two."""
    old, new = payload(2 * MiB, seed=13), payload(2 * MiB, seed=14)
    via_proxy.write("swap/obj", old)
    proxy.fail_next("short_body", method="GET", target="swap/obj")
    direct = s3_server.client()
    replaced: list[bool] = []

    def replace(**_: Any) -> None:  # runs once the first GET's headers are in
        if not replaced:
            replaced.append(True)
            direct.put_object(Bucket=s3_server.bucket, Key=via_proxy._s3.key("swap/obj"), Body=new)

    via_proxy._s3.boto.meta.events.register("after-call.s3.GetObject", replace)
    out = bytearray(len(old))
    via_proxy.read_into("swap/obj", 0, out)
    assert out == new
    cut, refused, fresh = proxy.requests("GET", "swap/obj")
    assert (
        cut.fault == "short_body"
        and refused.headers.get("if-match")
        and "if-match" not in fresh.headers
    )


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset", "reset_body", "short_body"])
def test_transient_faults_on_whole_read_head_and_list_are_retried(
    proxy: S3FaultProxy, via_proxy: S3Backend, kind: str
) -> None:
    """Whole-object reads, ``size`` (HEAD) and listings ride out transient faults."""
    via_proxy.write("w/a", b"alpha" * 1000)
    via_proxy.write("w/sub/b", b"beta")
    proxy.fail_next(kind, 1, method="GET", target="w/a")
    assert via_proxy.read("w/a") == b"alpha" * 1000
    proxy.fail_next(kind, 1, method="HEAD")
    assert via_proxy.size("w/a") == 5000
    proxy.fail_next(kind, 1, method="GET", target="list-type=2")
    assert via_proxy.list_objects("w") == ["w/a", "w/sub/b"]
    proxy.fail_next(kind, 1, method="GET", target="delimiter=")
    assert via_proxy.list_prefixes("w") == ["sub"]
    assert len(proxy.faults()) == 4


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset", "reset_after"])
def test_transient_faults_on_every_multipart_call_are_retried(
    s3_server: S3Server, proxy: S3FaultProxy, via_proxy: S3Backend, kind: str
) -> None:
    """Create, part uploads and complete each fail once with ``kind``; the stream still
    commits the exact bytes. A create whose answer was lost leaves an orphaned upload,
    which ``abort_unfinished`` removes."""
    data = payload(2 * PART + 999, seed=4)
    proxy.fail_next(kind, 1, method="POST", target="?uploads")
    proxy.fail_next(kind, 2, method="PUT", target="partNumber=")
    proxy.fail_next(kind, 1, method="POST", target="uploadId=")
    stream = via_proxy.open_stream("mpr/obj")
    stream.write(data)
    stream.commit()
    assert via_proxy.read("mpr/obj") == data
    assert len(proxy.faults()) == 4
    via_proxy.abort_unfinished("")
    assert _uploads(s3_server, via_proxy) == []


def test_completion_answer_lost_then_no_such_upload_is_success(
    proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """The completion succeeds but its answer is lost, and the retry hears NoSuchUpload
    (as AWS may answer): the backend checks the object's multipart ETag and reports the
    commit, instead of failing a save whose data is durable."""
    data = payload(PART + 4321, seed=5)
    proxy.fail_next("reset_after", method="POST", target="uploadId=")
    proxy.fail_next("no_such_upload", method="POST", target="uploadId=")
    via_proxy.write("lost-complete/obj", data)
    assert via_proxy.read("lost-complete/obj") == data
    assert [r.fault for r in proxy.requests("POST", "uploadId=")] == [
        "reset_after",
        "no_such_upload",
    ]


def test_no_such_upload_on_first_completion_is_an_error(
    s3_server: S3Server, proxy: S3FaultProxy, via_proxy: S3Backend
) -> None:
    """NoSuchUpload on the first completion (GC aborted the upload) fails the commit,
    names the object and says why; nothing becomes visible."""
    proxy.fail_next("no_such_upload", method="POST", target="uploadId=")
    stream = via_proxy.open_stream("aborted/obj")
    stream.write(payload(PART + 1, seed=6))
    with pytest.raises(StorageBackendError, match="aborted") as info:
        stream.commit()
    assert "aborted/obj" in str(info.value) and info.value.retryable is False
    assert not via_proxy.exists("aborted/obj")
    assert _uploads(s3_server, via_proxy) == []


def test_read_timeout_is_retried(s3_server: S3Server, proxy: S3FaultProxy) -> None:
    """A server that never answers (client read timeout) is retried like a dropped
    connection; the read then succeeds."""
    backend = s3_server.backend(endpoint=proxy.endpoint, read_timeout=1.0)
    try:
        backend.write("slow/obj", b"patience")
        proxy.fail_next("stall", method="GET", target="slow/obj", delay_s=30.0)
        assert backend.read("slow/obj") == b"patience"
        assert proxy.requests("GET", "slow/obj")[0].fault == "stall"
    finally:
        backend.close()


def test_retries_give_up_after_the_policy(s3_server: S3Server, proxy: S3FaultProxy) -> None:
    """A server that keeps throttling exhausts the policy's attempts: the error says
    retryable, names bucket and key, and exactly ``attempts`` requests were made."""
    backend = s3_server.backend(
        endpoint=proxy.endpoint, retry=RetryPolicy(attempts=4, total_seconds=60, sleep=no_wait)
    )
    try:
        proxy.fail_next("slowdown", 100, method="PUT")
        with pytest.raises(StorageBackendError) as info:
            backend.write("throttled/obj", b"x")
        assert info.value.retryable is True
        message = str(info.value)
        assert s3_server.bucket in message and backend._s3.key("throttled/obj") in message
        assert "SlowDown" in message
        assert len(proxy.requests("PUT")) == 4
    finally:
        backend.close()


# -- errors that retrying cannot fix ---------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.write("denied/obj", b"x"),
        lambda b: b.read("denied/obj"),
        lambda b: b.read_into("denied/obj", 0, bytearray(3)),
        lambda b: b.list_objects("denied"),
        lambda b: b.put_if_absent("denied/obj", b"x"),
    ],
    ids=["write", "read", "read_into", "list", "put_if_absent"],
)
def test_access_denied_is_clear_and_not_retried(
    proxy: S3FaultProxy, via_proxy: S3Backend, call: Any
) -> None:
    """AccessDenied becomes a non-retryable ``StorageBackendError`` that names bucket,
    key and the fix, after exactly one request."""
    via_proxy._conditional = True  # no probe: one request is one attempt
    proxy.fail_next("access_denied", 5)
    with pytest.raises(StorageBackendError) as info:
        call(via_proxy)
    error = info.value
    assert error.retryable is False and not isinstance(error, BlobNotFoundError)
    message = str(error)
    assert f"s3://{via_proxy.bucket}/{via_proxy.prefix}/denied" in message
    assert "AccessDenied" in message and "check the credentials" in message
    assert len(proxy.requests()) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.write("k/obj", b"x"),
        lambda b: b.write("k/big", payload(PART + 1)),
        lambda b: b.read("k/obj"),
        lambda b: b.read_into("k/obj", 0, bytearray(3)),
        lambda b: b.list_objects(),
        lambda b: b.list_prefixes(),
        lambda b: b.put_if_absent("k/obj", b"x"),
        lambda b: b.abort_unfinished(""),
        lambda b: b.delete(["k/obj", "k/other"]),
    ],
    ids=[
        "write",
        "write-multipart",
        "read",
        "read_into",
        "list",
        "list_prefixes",
        "put_if_absent",
        "abort_unfinished",
        "delete",
    ],
)
def test_missing_bucket_is_clear_and_not_retried(
    s3_server: S3Server, proxy: S3FaultProxy, call: Any
) -> None:
    """A bucket that does not exist (the real server's answer) is a non-retryable error
    naming the bucket, the key and the fix, after one request; it is not "not found"."""
    bucket = f"ckpt-missing-{uuid.uuid4().hex[:12]}"
    backend = s3_server.backend(f"s3://{bucket}/run", endpoint=proxy.endpoint, conditional_put="on")
    try:
        with pytest.raises(StorageBackendError) as info:
            call(backend)
    finally:
        backend.close()
    error = info.value
    assert error.retryable is False and not isinstance(error, BlobNotFoundError)
    message = str(error)
    assert f"s3://{bucket}/run" in message and "/run/run" not in message
    assert not error.path.startswith("run")  # paths are relative to the root, not keys
    assert "NoSuchBucket" in message and "create it or fix the URL" in message
    assert len(proxy.requests()) == 1


def _inject_delete_errors(backend: S3Backend, codes: list[str], path: str) -> list[int]:
    """A botocore hook that adds a per-key error for ``path`` (``codes[i]`` on the i-th
    DeleteObjects answer, none after): S3 reports these inside a 200 answer."""
    calls = [0]

    def hook(parsed: dict[str, Any], **_: Any) -> None:
        calls[0] += 1
        if calls[0] <= len(codes):
            parsed.setdefault("Errors", []).append(
                {"Key": backend._s3.key(path), "Code": codes[calls[0] - 1], "Message": "injected"}
            )

    backend._s3.boto.meta.events.register("after-call.s3.DeleteObjects", hook)
    return calls


def test_delete_retries_keys_the_server_could_not_delete(s3_server: S3Server) -> None:
    """Per-key SlowDown / InternalError inside a successful DeleteObjects answer make the
    batch go again until every key is gone."""
    backend = s3_server.backend()
    try:
        backend.write("d/a", b"1")
        backend.write("d/b", b"2")
        calls = _inject_delete_errors(backend, ["SlowDown", "InternalError"], "d/b")
        backend.delete(["d/a", "d/b", "d/missing"])
        assert calls[0] == 3
        assert backend.list_objects() == []
    finally:
        backend.close()


def test_delete_per_key_access_denied_is_clear(s3_server: S3Server) -> None:
    """A per-key AccessDenied is not retried and names the key and the fix."""
    backend = s3_server.backend()
    try:
        backend.write("d/a", b"1")
        calls = _inject_delete_errors(backend, ["AccessDenied"], "d/a")
        with pytest.raises(StorageBackendError) as info:
            backend.delete(["d/a"])
        assert calls[0] == 1
        assert info.value.retryable is False and info.value.path == "d/a"
        assert f"s3://{backend.bucket}/{backend.prefix}/d/a" in str(info.value)
        assert "check the credentials" in str(info.value)
    finally:
        backend.close()


# -- orphaned uploads, configuration ------------------------------------------------------


def test_abort_unfinished_removes_orphaned_uploads(s3_server: S3Server) -> None:
    """Uploads left by writers that died (streams never committed nor aborted, and one
    made by hand) are all aborted; nothing else is touched; the server lists none after."""
    backend = s3_server.backend(part_size=PART)
    try:
        backend.write("step-2/keep", b"committed")
        dead = [backend.open_stream(f"step-2/data/r{i}") for i in range(3)]
        for stream in dead:
            stream.write(payload(PART + 1, seed=7))
        other = backend.open_stream("step-3/data/r0")
        other.write(payload(PART + 1, seed=8))
        s3_server.client().create_multipart_upload(
            Bucket=s3_server.bucket, Key=backend._s3.key("step-2/x")
        )
        assert len(_uploads(s3_server, backend)) == 5
        assert backend.abort_unfinished("step-2") == 4
        assert len(_uploads(s3_server, backend)) == 1  # step-3 is another prefix
        assert backend.abort_unfinished("") == 1
        assert _uploads(s3_server, backend) == []
        assert backend.list_objects() == ["step-2/keep"]
        for stream in [*dead, other]:
            stream.abort()  # the dead writers' own aborts after the fact are harmless
    finally:
        backend.close()


def test_aws_endpoint_url_env_is_honoured(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``open_backend("s3://...")`` with no config finds the server through
    ``AWS_ENDPOINT_URL`` and the credentials through the environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    backend = open_backend(s3_server.url())
    try:
        assert isinstance(backend, S3Backend)
        backend.write("env/obj", b"via the environment")
        assert backend.read("env/obj") == b"via the environment"
        direct = s3_server.client().get_object(
            Bucket=s3_server.bucket, Key=backend._s3.key("env/obj")
        )
        assert direct["Body"].read() == b"via the environment"
    finally:
        backend.close()


def test_aws_endpoint_url_s3_takes_precedence(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service-specific ``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``."""
    for name, value in base_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    backend = open_backend(s3_server.url())
    try:
        backend.write("env/obj", b"s3-specific")
        assert backend.read("env/obj") == b"s3-specific"
    finally:
        backend.close()


def test_checksum_algorithm_round_trip(s3_server: S3Server) -> None:
    """With a server-side checksum asked for, single PUTs and multipart uploads still
    land intact (a server that ignores the checksum is fine too)."""
    backend = s3_server.backend(part_size=PART, checksum_algorithm="CRC32")
    try:
        small, big = payload(1000, seed=9), payload(PART + 3, seed=10)
        backend.write("ck/small", small)
        backend.write("ck/big", big)
        assert backend.read("ck/small") == small
        assert backend.read("ck/big") == big
    finally:
        backend.close()


def test_md5_of_parts_matches_server_etag(s3_server: S3Server) -> None:
    """The multipart ETag the backend expects after a lost completion answer (MD5 of the
    parts' MD5s, dash, part count) is what this server reports."""
    backend = s3_server.backend(part_size=PART)
    try:
        parts = [payload(PART, seed=11), payload(12_345, seed=12)]
        backend.write("etag/obj", b"".join(parts))
        digests = b"".join(hashlib.md5(p).digest() for p in parts)
        head = s3_server.client().head_object(
            Bucket=s3_server.bucket, Key=backend._s3.key("etag/obj")
        )
        assert head["ETag"] == f'"{hashlib.md5(digests).hexdigest()}-2"'
    finally:
        backend.close()
