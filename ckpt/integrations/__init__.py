"""Integrations with training frameworks, each importing its framework only when used.

* ``ckpt.integrations.lightning``: a Lightning ``CheckpointIO`` plugin.
* ``ckpt.integrations.transformers``: a Hugging Face ``TrainerCallback``.
"""
