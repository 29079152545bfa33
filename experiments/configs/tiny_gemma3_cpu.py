"""A tiny Gemma-3-shaped run for CPU checks and tests (`tests/experiments/tiny_hf.py` writes such a model).

    python -m experiments.train --config experiments/configs/tiny_gemma3_cpu.py --model FOLDER --data rows.jsonl \
        --workdir runs/tiny --cpu-devices 8 --mesh fsdp=4,tensor=2
"""

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.lib.run_config import RunConfig

CONFIG = RunConfig(
    mos=MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, alpha=8.0),
    mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
    global_batch=8, seq_len=32, loss_chunk=16, pack=1, steps=6, lr=1e-2, warmup_frac=0.0, schedule="linear",
    checkpoint_every=2, eval_every=3, eval_fraction=0.25, eval_max=16, dtype="bfloat16", generate=2, max_new_tokens=4,
)
