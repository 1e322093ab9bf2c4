"""Process-wide JAX settings shared by the command lines (training, evaluation, inference, benchmarks)."""
from __future__ import annotations

import errno
import logging as logging_lib
import os
import re
import sys
import threading
import time
import traceback
import warnings

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
  """Orbax and TFDS log a dozen INFO lines per checkpoint or read; keep their warnings only.

  A failed asynchronous checkpoint write is logged by four Orbax threads, each with the full
  traceback (about 400 lines in all), before the same exception reaches the training loop, which
  reports it (with its traceback when it is a bug): Orbax's error records keep one line each."""
  _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if not any(q in record.pathname for q in self._QUIET):
      return True
    if record.levelno >= logging_lib.ERROR and record.exc_info:
      record.msg, record.args = _summary(record.getMessage())[:300], ()
      record.exc_info = record.exc_text = None
    return record.levelno >= logging_lib.WARNING


class _DropUnretrievedTasks(logging_lib.Filter):
  """A failed asynchronous checkpoint write logs each of its hundreds of write tasks' tracebacks as
  'Task exception was never retrieved'; the same error reaches the training loop, which reports it."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return not str(record.msg).startswith("Task exception was never retrieved")


def _closed_loop_unraisable(default_hook):
  """TensorStore's writer threads, finishing after a failed checkpoint write has closed Orbax's event
  loop, each report 'Event loop is closed' (hundreds of tracebacks); the write's own error reaches
  the training loop, which reports it. Other unraisable exceptions keep the default hook."""
  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    default_hook(unraisable)
  hook.drops_closed_loops = True
  return hook


def quiet_library_logs() -> None:
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
  logging_lib.getLogger("asyncio").addFilter(_DropUnretrievedTasks())
  if not getattr(sys.unraisablehook, "drops_closed_loops", False):
    sys.unraisablehook = _closed_loop_unraisable(sys.unraisablehook)


OS_ERROR_EXIT = 6  # beside errors.UserError's codes 1-5
BUG_EXIT = 70  # EX_SOFTWARE


# What a failed system call on a path the user gave means, and what to do about it.
_OS_ERRORS = {
    errno.ENOENT: "does not exist; check the path",
    errno.EACCES: "is not accessible (permission denied); choose a path you can write, or fix its "
                  "permissions",
    errno.EPERM: "is not accessible (operation not permitted); choose another path",
    errno.EROFS: "is on a read-only file system; choose a writable path",
    errno.ENOSPC: "could not be written: the disk is full; free space or choose another path",
    errno.EDQUOT: "could not be written: the disk quota is exceeded; free space or choose another path",
    errno.ENOTDIR: "is not a folder (a file stands in its path); choose another path",
    errno.EISDIR: "is a folder where a file was expected; give the file's path",
    errno.EEXIST: "already exists as something else; choose another path",
    errno.EFBIG: "could not be written: a file grew past the size limit (ulimit -f) or the disk's "
                 "largest file; free space, lift the limit or choose another path",
}
# TensorStore (Orbax's writer) reports a failed system call inside a ValueError's text.
_TENSORSTORE_OS_ERROR = re.compile(r'(?:Failed writing|Error writing local file): "(?P<path>[^"]+)".*'
                                   r"os_error_code='(?P<errno>\d+)'", re.S)

# TensorFlow's file-system errors (tf.io.gfile, gs:// paths), matched by name: no TF import here.
_TF_FILE_ERRORS = {
    "NotFoundError": "was not found; check the path",
    "PermissionDeniedError": "is not accessible (permission denied); check the credentials or path",
    "ResourceExhaustedError": "ran out of a resource (disk, memory or quota); free some and retry",
    "FailedPreconditionError": "cannot be used as it is (e.g. a file where a folder is needed); "
                               "check the path",
}


def user_error_line(e: BaseException) -> tuple[str, int] | None:
  """(one line naming the problem and the fix, exit code) for exceptions a user's input or machine
  causes; None for anything else (a bug: its traceback is kept)."""
  from deeplab_jax.errors import UserError
  if isinstance(e, UserError):
    return str(e), e.exit_code
  if isinstance(e, OSError) and e.errno in _OS_ERRORS:
    where = e.filename if e.filename is not None else "a file"
    return f"{where} {_OS_ERRORS[e.errno]} ({os.strerror(e.errno)})", OS_ERROR_EXIT
  found = _TENSORSTORE_OS_ERROR.search(str(e)) if isinstance(e, ValueError) else None
  if found and int(found["errno"]) in _OS_ERRORS:
    code = int(found["errno"])
    return f"{found['path']} {_OS_ERRORS[code]} ({os.strerror(code)})", OS_ERROR_EXIT
  name = type(e).__name__
  if type(e).__module__.startswith("tensorflow") and name in _TF_FILE_ERRORS:
    return f"{_summary(str(e))}: {_TF_FILE_ERRORS[name]}", OS_ERROR_EXIT
  if "RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e).lower():
    return (f"out of device memory ({_summary(str(e))[:200]}); lower config.train.batch_size or "
            f"config.input.crop_size, or use more devices", OS_ERROR_EXIT)
  return None


def run_command(fn, *, compile_cache: bool = True):
  """The command lines' shared setup: compilation cache, quiet library logs, and errors turned into
  one stderr line `deeplab_jax: error: ...` and a non-zero exit. What the user can fix (a UserError,
  a missing or unwritable path, a full disk, memory) gets that line alone; anything else is a bug:
  its traceback, then a last line that says so (never a traceback ending in an empty message)."""
  from deeplab_jax.errors import Preempted
  if compile_cache:
    enable_compilation_cache()
  quiet_library_logs()
  try:
    return fn()
  except KeyboardInterrupt:
    _fail("interrupted", 130)
  except Preempted as e:  # a clean stop, not an error
    sys.stdout.flush()
    _whole_line(f"deeplab_jax: {e}")
    sys.exit(e.exit_code)
  except Exception as e:  # noqa: BLE001 (every exception ends in one readable line)
    known = user_error_line(e)
    if known is not None:
      _fail(*known)
    traceback.print_exc()
    _fail(f"unexpected {type(e).__name__}: {_summary(str(e))[:300]} (a bug in deeplab_jax or its "
          f"libraries: please report it with the traceback above)", BUG_EXIT)


def _parse_flags(argv):
  """absl's parsing, with a bad flag, config override or config file reported in one line."""
  from absl import flags
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{_summary(str(e))}; see --helpshort", 2)
  except KeyError as e:  # ml_collections: an override naming no field of the config
    _fail(f"a --config.* override names no field of the config: {_summary(str(e.args[0]))}", 2)
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if type(flag.value).__name__ == "_ErrorConfig":  # ml_collections defers a failed load to its use
      reason = _summary(str(flag.value._error), last=True)
      _fail(f"--{name}={flag.config_filename} could not be loaded ({reason}); give the path of a "
            f"config file, e.g. configs/shapes.py", 2)
  return remaining


def run_app(main):
  """`absl.app.run(main)` for the command lines, with flag errors in one line too (run_command has
  the rest)."""
  from absl import app

  def main_with_usage_line(argv):
    try:
      return main(argv)
    except app.UsageError as e:  # absl would print the module's whole docstring first
      _fail(f"{e}; see --helpshort", 2)

  app.run(main_with_usage_line, flags_parser=_parse_flags)


def _summary(message: str, last: bool = False) -> str:
  """One line of a possibly multi-line message: its first two lines joined (or its last line)."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if not lines:
    return "(no message)"
  return lines[-1] if last else " ".join(lines[:2])


EXIT_GRACE_S = 5.0


def _fail(line: str, code: int):
  sys.stdout.flush()
  text = f"deeplab_jax: error: {line}"
  fd = _own_stderr()
  if fd is None:  # a test calling run_command in-process: its capture gets the line
    print(text, file=sys.stderr, flush=True)
    sys.exit(code)
  _last_line(fd, text)
  _exit_within(EXIT_GRACE_S, code)
  sys.exit(code)


def _own_stderr() -> int | None:
  """The process's own stderr file descriptor; None under a test's capture, which must neither be
  redirected nor outlived."""
  if sys.stderr is not sys.__stderr__:
    return None
  try:
    return sys.stderr.fileno()
  except (AttributeError, OSError, ValueError):  # e.g. an embedding host's stream with no file
    return None


def _write_line(fd: int, text: str):
  """One write of the line and its newline: processes that share a pipe (launch/local_processes.sh)
  would otherwise interleave their texts and newlines (print writes them apart)."""
  os.write(fd, (text + "\n").encode())


def _whole_line(text: str):
  sys.stderr.flush()
  fd = _own_stderr()
  if fd is None:
    print(text, file=sys.stderr, flush=True)
  else:
    _write_line(fd, text)


def _last_line(fd: int, text: str):
  """Library threads that outlive the error (the summary writer's, a failed asynchronous checkpoint
  write's event loop, TensorStore's C++ threads) would log below it, from Python or C++: stderr goes
  to /dev/null first, then the line is written to the stream it was, so it is the last one."""
  logging_lib.disable(logging_lib.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  warnings.simplefilter("ignore")  # e.g. "coroutine ... was never awaited" at interpreter exit
  sys.stderr.flush()
  stream = os.dup(fd)
  os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
  _write_line(stream, text)
  os.close(stream)


def _exit_within(seconds: float, code: int):
  """Interpreter exit joins every non-daemon thread, and Orbax's signaling threads wait without end
  for a checkpoint folder whose creation failed (an unwritable folder): the process would hang after
  its error line. What has to finish did before the line (train.py waits for its saves and flushes
  its summaries); the orderly exit gets this long, then the process ends with its code."""
  def end():
    time.sleep(seconds)
    os._exit(code)
  threading.Thread(target=end, name="exit_within", daemon=True).start()
