"""Training: the one optax step (optionally sharded) and Orbax checkpoints of the training state."""

from mos_jax._src.train.step import make_step  # A jitted optax step over any trainable pytree (pjit with shardings).
from mos_jax._src.train.checkpoint import TrainCheckpointer  # Orbax checkpoints of the state, checked on restore.
from mos_jax._src.train.checkpoint import Restored  # What TrainCheckpointer.restore returns (step, state, data_state).
from mos_jax._src.train.checkpoint import CheckpointLockedError  # Another writer holds the checkpoint directory.
from mos_jax._src.core.identity import adapter_identity  # What ties a checkpoint to one adapter on one model (JSON).
from mos_jax._src.core.identity import tree_layout  # A pytree's leaf paths, shapes and dtypes (JSON), for identities.

__all__ = ["make_step", "TrainCheckpointer", "Restored", "CheckpointLockedError", "adapter_identity", "tree_layout"]
