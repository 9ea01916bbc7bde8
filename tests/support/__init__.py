"""Helpers shared by the test folders (and the benchmarks): one concern per module.

* ``gloo``: run a function on N real gloo ranks;
* ``redis_server``: real ``redis-server`` processes;
* ``s3_servers`` / ``s3_proxy``: real S3 servers on loopback and a fault-injecting proxy;
* ``faulty``: a storage backend wrapper that fails or holds chosen operations;
* ``on_disk``: saving with a private engine, bit-for-bit checks, editing a saved checkpoint;
* ``workers``: the processes tests spawn.
"""
