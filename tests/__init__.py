"""The test suite, laid out like the code.

* ``ckpt/``: the public face and the save path (engine, manager, state, format, manifest
  builder, convert, corruption, exact resume, node failure, checkpoints on S3);
* ``recovery/``: reshard planning and the loader;
* ``storage_backends/``: one conformance suite subclassed per backend, disk full, tiers;
* ``coordination/``: one conformance suite for the embedded and the Redis coordinator;
* ``distributed/``: real multi-rank gloo jobs (sharded saves, the resharding matrix);
* ``support/``: what several folders share (servers, fault injection, launchers, checks)
  and ``support/workers/``, the processes tests spawn;
* ``test_layers.py``: the layers contract of DESIGN.md over the whole source tree.

Tests marked ``@pytest.mark.slow`` run only with ``--full`` (see ``conftest.py``).
"""
