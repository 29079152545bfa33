"""MoS on Gemma 3 27B (instruction-tuned) on a v4-32 slice: FSDP over its 16 chips, bf16 base.

The memory per chip of this config (``python -m experiments.pod_memory``) is in docs/training.md; the run
prints it again before loading and refuses to start if it does not fit. Data: ``DATA=gs://.../train.jsonl``
(tpu/README.md) or ``--data``.
"""

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.lib.run_config import RunConfig

CONFIG = RunConfig(
    model="hf://google/gemma-3-27b-it", accelerator="v4-32",
    mos=MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, alpha=16.0, dropout=0.05),
    mesh=MeshConfig(data=1, fsdp=16, tensor=1),
    global_batch=32, seq_len=2048, loss_chunk=512, remat="decoder", dtype="bfloat16",
    steps=2000, lr=2e-4, warmup_frac=0.03, schedule="cosine", clip_norm=1.0,
    checkpoint_every=200, eval_every=200, generate=8, max_new_tokens=64,
)
