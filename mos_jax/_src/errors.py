"""The error types every file, checkpoint and adapter check raises."""


class MismatchError(ValueError):
  """A file, checkpoint or adapter was made for another model, adapter config, routing or state layout."""


class CorruptError(RuntimeError):
  """A file or checkpoint cannot be read back, or reads back different from what was saved."""


class LockedError(RuntimeError):
  """Another process is writing the same export folder or checkpoint directory."""
