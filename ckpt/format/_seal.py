"""The manifest's own checksum: its first key, verified before anything else is parsed."""

from __future__ import annotations

from ckpt.errors import CorruptCheckpointError
from ckpt.format._codec import DIGEST_HEX, checksum

_SEAL_OPEN = b'{"manifest_checksum":"'
_SEAL_BLANK = b"0" * DIGEST_HEX


def seal_manifest(body: bytes) -> bytes:
    """Prefix a JSON object with the checksum of the whole manifest.

    The digest is taken over the final bytes with the digest itself written as zeros,
    so a reader checks exactly the bytes it read, without re-serialising anything.
    """
    if not body.startswith(b"{") or body == b"{}":
        raise ValueError("a manifest body must be a non-empty JSON object")
    rest = memoryview(body)[1:]
    digest = checksum(_SEAL_OPEN, _SEAL_BLANK, b'",', rest).encode()
    return b"".join((_SEAL_OPEN, digest, b'",', rest))


def verify_manifest_seal(data: bytes, where: str) -> None:
    """Raise ``CorruptCheckpointError`` unless ``data`` carries a matching manifest checksum."""
    end = len(_SEAL_OPEN) + DIGEST_HEX
    if not data.startswith(_SEAL_OPEN) or len(data) < end + 2:
        raise CorruptCheckpointError(
            f"{where}: the file carries no checksum; it is corrupt or not ckpt's"
        )
    stored = data[len(_SEAL_OPEN) : end]
    if checksum(_SEAL_OPEN, _SEAL_BLANK, memoryview(data)[end:]).encode() != stored:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch (its bytes differ from what was sealed); the file is "
            "corrupt"
        )


def seal_digest(data: bytes) -> str:
    """The digest a sealed document carries (its first key), unverified; "" when none."""
    end = len(_SEAL_OPEN) + DIGEST_HEX
    if not data.startswith(_SEAL_OPEN) or len(data) < end:
        return ""
    return data[len(_SEAL_OPEN) : end].decode("ascii", "replace")
