"""Scale-out: device meshes, partitioning rules for base, pools and batch, and multi-host set-up."""

from mos_jax.parallel._distributed import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, global_batch,
                                           initialize, is_main_process, process_rows)
from mos_jax.parallel._mesh import (AXES, BATCH_AXES, DEFAULT_TENSOR_RULES, MeshConfig, base_shardings, base_spec,
                                    batch_sharding, init_opt_state, make_mesh, pool_shardings)

__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "global_batch", "initialize", "is_main_process",
    "process_rows", "AXES", "BATCH_AXES", "DEFAULT_TENSOR_RULES", "MeshConfig", "base_shardings", "base_spec",
    "batch_sharding", "init_opt_state", "make_mesh", "pool_shardings",
]
