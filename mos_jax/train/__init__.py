"""Training: the one optax step (optionally sharded) and Orbax checkpoints of the training state."""

from mos_jax.train._checkpoint import (CheckpointCorruptError, CheckpointLockedError, CheckpointMismatchError, Restored,
                                       TrainCheckpointer)
from mos_jax.train._step import TrainableLoss, make_step

__all__ = ["CheckpointCorruptError", "CheckpointLockedError", "CheckpointMismatchError", "Restored", "TrainCheckpointer",
           "TrainableLoss", "make_step"]
