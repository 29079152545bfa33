"""mos_jax's implementation. Import from the public packages (``mos_jax``, ``mos_jax.core``, ...), never from here.

Units, each importing only the ones below it (``tests/package/test_layout.py``):
``errors`` (the two error types) and ``io`` (atomic file writes) at the bottom,
``core`` (framework-free MoS: config, spec, pools, assembly, counting), then
``formats``, ``train``, ``parallel`` on the core, the backends ``linen`` and
``nnx`` on those, and ``hf`` (HF ``transformers`` glue) on ``linen``.
"""
