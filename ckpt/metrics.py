"""Prometheus metrics of ckpt's saves, restores and retries (docs/METRICS.md).

With ``prometheus_client`` installed (``pip install 'torch-ckpt[metrics]'``), every save
and restore through ``ckpt.save``/``ckpt.async_save``/``ckpt.load``/``ckpt.restore`` or
a ``CheckpointManager`` is recorded in one process-wide set of metrics:

=================================  =========  =======================  ============================
name                               type       labels                   what
=================================  =========  =======================  ============================
``ckpt_save_stall_seconds``        histogram  ``backend``, ``kind``    time the save call blocked
``ckpt_save_seconds``              histogram  ``backend``, ``kind``    call to commit (committed)
``ckpt_saved_bytes_total``         counter    ``backend``              bytes written (committed)
``ckpt_save_failures_total``       counter    ``backend``, ``kind``,   failed saves
                                              ``error``
``ckpt_restore_seconds``           histogram  ``backend``              successful restores
``ckpt_restore_fallbacks_total``   counter    ``backend``              steps/copies skipped
``ckpt_retries_total``             counter    ``service``              retried calls
=================================  =========  =======================  ============================

``backend`` is ``local``, ``s3``, ``tiered`` or ``other``; ``kind`` is ``async`` or
``sync`` (a blocking save); ``error`` is the ``ckpt.errors`` class that ended the save
(``other`` for anything else); ``service`` is ``s3``, ``redis`` or ``restore``.

They are exported on ``prometheus_client``'s default registry at the first save or
restore, so that ``prometheus_client.start_http_server(port)`` shows them with no
further step. ``register(registry)`` exports them on another registry instead (call it
before the first save to keep them off the default one); registering twice is harmless.
Without ``prometheus_client`` nothing is recorded and nothing else changes.
"""

from __future__ import annotations

from ckpt._metrics import available, register, unregister

__all__ = ["available", "register", "unregister"]
