"""Experiments with mos_jax: runnable scripts and the small library they share.

Each script runs from the repository root as a module, e.g.
``python -m experiments.sst2_demo``; the code they share is in
:mod:`experiments.lib` (which imports only ``mos_jax`` and its own modules).
"""
