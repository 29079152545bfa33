"""LLaMA2-7B MoS on a TPU v4-8 (4 chips) / v5e-16: FSDP over all chips, paper hyper-parameters.

Weights: a local HF folder (PyTorch safetensors are fine) given as `hf_model`, copied to each
worker by tpu/setup.sh, or a hub name when the workers have network.
"""

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.train_sharded import RunConfig

CONFIG = RunConfig(
    hf_model="/mnt/models/Llama-2-7b-hf",
    mos=MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, alpha=16.0, dropout=0.1),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    global_batch=16, seq_len=512, steps=10_000, lr=2e-4, warmup_frac=0.03, clip_norm=0.3,
    compute_dtype="bfloat16", checkpoint_every=500, fsdp_min_size=2**14,
)
