"""Scale-out: device meshes, partitioning rules for base, pools and batch, and multi-host set-up."""

from mos_jax.parallel._distributed import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, global_batch,
                                           initialize, is_main_process, on_cloud_tpu, process_row_ranges,
                                           tpu_chip_count)
from mos_jax.parallel._mesh import (AXES, BATCH_AXES, DEFAULT_TENSOR_RULES, MeshConfig, base_shardings, base_spec,
                                    batch_sharding, init_opt_state, make_mesh, pool_shardings)
from mos_jax.parallel._preemption import preemption_notice, sigterm_flag

__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "global_batch", "initialize", "is_main_process",
    "on_cloud_tpu", "preemption_notice", "process_row_ranges", "sigterm_flag", "tpu_chip_count", "AXES", "BATCH_AXES",
    "DEFAULT_TENSOR_RULES", "MeshConfig", "base_shardings", "base_spec", "batch_sharding", "init_opt_state",
    "make_mesh", "pool_shardings",
]
