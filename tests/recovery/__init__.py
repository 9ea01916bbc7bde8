"""Tests of the ``recovery`` package: reshard planning and the loader."""
