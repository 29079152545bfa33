"""MoS on Gemma 3 12B (instruction-tuned) on a v4-32 slice (16 chips): the shared pod settings of
``experiments.lib.run_config.pod_config``.

Memory per chip: docs/training.md (``python -m experiments.pod_memory``); the run prints it again before
loading and refuses to start if it does not fit. Data: ``DATA=gs://.../train.jsonl`` (tpu/README.md) or ``--data``.
"""

from experiments.lib.run_config import pod_config

CONFIG = pod_config("hf://google/gemma-3-12b-it", "v4-32")
