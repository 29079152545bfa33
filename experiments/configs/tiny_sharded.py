"""Config for `python -m experiments.train_sharded`: a tiny random Llama, for tests and CPU smoke runs."""

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.train_sharded import ModelConfig, RunConfig

CONFIG = RunConfig(
    model=ModelConfig(hidden=32, intermediate=48, layers=4, heads=4, kv_heads=2, vocab=64),
    mos=MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2),
    mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
    global_batch=8, seq_len=16, steps=4, lr=1e-2, checkpoint_every=2,
)
