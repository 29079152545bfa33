"""LLaMA2-7B MoS on a TPU slice (v4-8, v4-32, v5e-16, ...): FSDP over all chips, paper hyper-parameters.

Weights: tpu/setup.sh copies them to every worker (MODEL_SRC=gs://BUCKET/Llama-2-7b-hf, or
hf://meta-llama/Llama-2-7b-hf with a Hugging Face token) and tpu/launch.sh passes that folder as
`--hf-model`. Without it, `hf_model` below is read from the hub at start (the workers need
network access and a token with access to the gated repository).
"""

from mos_jax import MoSConfig
from mos_jax.parallel import MeshConfig
from experiments.train_sharded import RunConfig

CONFIG = RunConfig(
    hf_model="meta-llama/Llama-2-7b-hf",
    mos=MoSConfig(rank=8, equivalent_rank=1, shards_per_vector=2, alpha=16.0, dropout=0.1),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    global_batch=16, seq_len=512, steps=10_000, lr=2e-4, warmup_frac=0.03, clip_norm=0.3,
    compute_dtype="bfloat16", checkpoint_every=500, fsdp_min_size=2**14,
)
