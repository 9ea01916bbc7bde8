"""Helpers shared by the test folders (and the benchmarks): one concern per module.

* ``ports``: free loopback ports (the only ``free_port``);
* ``gloo``: run a function on N real gloo ranks;
* ``redis_server``: real ``redis-server`` processes (the only launcher);
* ``s3_servers`` / ``s3_proxy``: real S3 servers on loopback and a fault-injecting proxy;
* ``faulty``: a storage backend wrapper that fails or holds chosen operations;
* ``checks``: bit-for-bit comparisons of tensors;
* ``on_disk``: saving with a private engine and editing a saved checkpoint on disk;
* ``workers``: the processes tests spawn.
"""
