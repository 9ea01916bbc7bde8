"""Tests of the ``ckpt`` package: public face, save path, format, manager, CLI tools."""
