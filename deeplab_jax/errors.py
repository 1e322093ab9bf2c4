"""Errors a user can fix. Each message is one line naming the problem and the fix; `main` prints it
and exits non-zero instead of showing a traceback."""


class UserError(Exception):
  """Base: bad input, not a bug. Subclasses say which kind."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config value that cannot work."""
  exit_code = 2


class DataError(UserError):
  """A data set that is missing, not prepared, or does not fit the config."""
  exit_code = 3


class CheckpointError(UserError):
  """A checkpoint that cannot be restored into this config's model."""
  exit_code = 4


class NonFiniteLossError(UserError):
  """Training produced a NaN or infinite loss; the last checkpoint is left intact."""
  exit_code = 5


class WeightsError(CheckpointError):
  """Pretrained weights that are unreadable, of another architecture, or do not fit the model."""


class Preempted(UserError):
  """SIGTERM (a spot VM's preemption notice): every process saved the same step; rerunning the same
  command resumes from it. Not a failure, but not a finished run either."""
  exit_code = 143  # 128 + SIGTERM
