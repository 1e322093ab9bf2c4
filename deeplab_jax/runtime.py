"""Process-wide JAX settings shared by the command lines (training, evaluation, inference, benchmarks)."""
from __future__ import annotations

import logging as logging_lib
import os
import sys

from absl import logging as absl_logging
import jax


def enable_compilation_cache() -> None:
  """Persist compiled programs across runs (a resumed or repeated run skips most compile time).

  In `$JAX_COMPILATION_CACHE_DIR` if set, else the user cache folder; DEEPLAB_JAX_NO_COMPILE_CACHE=1
  turns it off.
  """
  if os.environ.get("DEEPLAB_JAX_NO_COMPILE_CACHE") == "1":
    return
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "deeplab_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _DropLibraryInfo(logging_lib.Filter):
  """Orbax and TFDS log a dozen INFO lines per checkpoint or read; keep their warnings only."""
  _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or not any(q in record.pathname for q in self._QUIET)


def quiet_library_logs() -> None:
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def run_command(fn, *, compile_cache: bool = True):
  """The command lines' shared setup: compilation cache, quiet library logs, and a UserError turned
  into one stderr line and its exit code instead of a traceback."""
  from deeplab_jax.errors import UserError
  if compile_cache:
    enable_compilation_cache()
  quiet_library_logs()
  try:
    return fn()
  except UserError as e:
    print(f"deeplab_jax: error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
