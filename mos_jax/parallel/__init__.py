"""Scale-out: device meshes, partitioning rules for base, pools and batch, and multi-host set-up."""

# Meshes and shardings.
from mos_jax._src.parallel.mesh import MeshConfig  # Sizes of the (data, fsdp, tensor) mesh axes.
from mos_jax._src.parallel.mesh import make_mesh  # The device mesh of a MeshConfig.
from mos_jax._src.parallel.mesh import base_spec  # The PartitionSpec of one frozen base leaf.
from mos_jax._src.parallel.mesh import base_shardings  # Shardings of the frozen base params.
from mos_jax._src.parallel.mesh import pool_shardings  # Shardings of an adapter's pools.
from mos_jax._src.parallel.mesh import batch_sharding  # Sharding of a batch (rows over data and fsdp).
from mos_jax._src.parallel.mesh import init_opt_state  # Optimizer state created sharded like the trainable pytree.
# Multi-host.
from mos_jax._src.parallel.distributed import initialize  # jax.distributed set-up from arguments, env or a TPU pod.
from mos_jax._src.parallel.distributed import is_main_process  # Whether this is process 0.
from mos_jax._src.parallel.distributed import global_batch  # A global array from the rows each process loads.
from mos_jax._src.parallel.distributed import process_row_ranges  # The batch rows each process must load.
from mos_jax._src.parallel.distributed import on_cloud_tpu  # Whether this host has TPU chips.
from mos_jax._src.parallel.distributed import tpu_chip_count  # Number of TPU chips on this host's PCI bus.
from mos_jax._src.parallel.distributed import ENV_COORDINATOR  # Env var naming the coordinator address.
from mos_jax._src.parallel.distributed import ENV_NUM_PROCESSES  # Env var naming the number of processes.
from mos_jax._src.parallel.distributed import ENV_PROCESS_ID  # Env var naming this process's id.
# Preemption.
from mos_jax._src.parallel.preemption import preemption_notice  # Whether any host was told to stop (SIGTERM, TPU).
from mos_jax._src.parallel.preemption import sigterm_flag  # An Event set when this process gets SIGTERM.

__all__ = [
    "MeshConfig", "make_mesh", "base_spec", "base_shardings", "pool_shardings", "batch_sharding", "init_opt_state",
    "initialize", "is_main_process", "global_batch", "process_row_ranges", "on_cloud_tpu", "tpu_chip_count",
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "preemption_notice", "sigterm_flag",
]
