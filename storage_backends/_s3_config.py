"""Settings of the S3 backend: plain dataclasses, importable without any S3 client library."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_PART = 5 << 20  # S3's smallest part, except the last one
MAX_PARTS = 10_000


@dataclass(frozen=True)
class RetryPolicy:
    """How S3 calls are retried: full-jitter exponential backoff, bounded both ways.

    Args:
        attempts: at most this many tries of one call.
        total_seconds: and at most this long in all.
        initial_seconds / max_seconds: the backoff range.
        sleep: the sleep function (tests pass one that does not wait).
    """

    attempts: int = 10
    total_seconds: float = 120.0
    initial_seconds: float = 0.1
    max_seconds: float = 10.0
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class S3Config:
    """Everything a user of AWS, MinIO, Ceph RGW, R2 or SeaweedFS may need to set.

    Credentials come from boto3's standard chain (environment, profile, instance role)
    unless given here; they are never logged.

    Args:
        endpoint_url: the S3 endpoint (default: ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL``, else AWS).
        region: the region (default: boto3's chain, else us-east-1).
        addressing_style: "path", "virtual" or "auto".
        profile: a named profile of the shared config files.
        part_size: multipart part size; also the single-PUT limit.
        max_concurrency: parts in flight per object (memory is bounded by
            part_size x max_concurrency per stream, and parts are views of the caller's data).
        sse / sse_kms_key_id: server-side encryption ("AES256" or "aws:kms").
        checksum_algorithm: server-side integrity checksum (e.g. "CRC32", "CRC32C",
            "SHA256") where the server supports it; None leaves boto3's default.
        conditional_put: "auto" probes once whether the server honours If-None-Match,
            "on" trusts it, "off" always uses the check-then-put fallback.
        connect_timeout / read_timeout: socket timeouts in seconds.
        max_pool_connections: HTTP connections kept per backend.
        retry: the retry policy.
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    profile: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    part_size: int = 64 << 20
    max_concurrency: int = 8
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksum_algorithm: str | None = None
    conditional_put: str = "auto"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 32
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part)")
        if self.conditional_put not in ("auto", "on", "off"):
            raise ValueError('conditional_put must be "auto", "on" or "off"')
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError('addressing_style must be "auto", "path" or "virtual"')
