"""Pick a backend from a URL."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from storage_backends._errors import StorageBackendError
from storage_backends._local import LocalBackend
from storage_backends._protocol import StorageBackend


def open_backend(url: str | os.PathLike[str]) -> StorageBackend:
    """Open the backend for ``url``: a plain path or ``file://`` URL.

    Raises:
        StorageBackendError: the scheme is not supported.
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageBackendError(f"file URL with a host is not supported: {text!r}")
            return LocalBackend(unquote(parsed.path))
        return LocalBackend(text)
    raise StorageBackendError(
        f"unsupported storage URL scheme {parsed.scheme!r} in {text!r}: use a local path or file://"
    )
