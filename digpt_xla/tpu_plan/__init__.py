"""The training step as a TPU compiler sees it, on a machine without a TPU.

``trace``: the real ``Pretrainer`` step traced by torch_xla on XLA:CPU devices (never compiled or run there) and
written as an HloModuleProto. ``libtpu_compile``: that program compiled for a TPU topology by libtpu, in a separate
interpreter that has jax[tpu] (jax and torch_xla never share a process). ``chips``: published per-chip peaks and
the step-time estimate built on them. ``plan``: the three put together, as ``tools/tpu_plan.py`` runs them.
"""
