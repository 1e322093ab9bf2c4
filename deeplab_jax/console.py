"""What a person watching a run reads: a short header, one progress bar (on a terminal; plain lines
every ~10% of the run otherwise), one line per evaluation. Every detail (absl's lines, each metric
write, per-class IoU, timings) goes to a log file in the workdir and to TensorBoard; `--verbosity=1`
shows absl's lines live again. Only process 0 of a multi-host run prints."""
from __future__ import annotations

import atexit
import logging as logging_lib
import math
import os
import sys
import tempfile
import time

from absl import logging as absl_logging
from etils import epath
import jax

LOG_NAME = "train.log"
_BUFFER_LIMIT = 20_000  # records held before the workdir exists (a bad input exits long before)


def _is_local(path) -> bool:
  return "://" not in str(path)


class _LogFile(logging_lib.Handler):
  """Every record at the logger's level, in absl's format, into a log file. Records before the
  workdir exists are held (a run that fails its checks writes nothing); a gs:// workdir gets a
  local file, copied there when the process ends."""

  def __init__(self):
    super().__init__(logging_lib.DEBUG)
    self.setFormatter(absl_logging.PythonFormatter())
    self.held: list[logging_lib.LogRecord] = []
    self.stream = None
    self.path = None

  def emit(self, record):
    try:
      if self.stream is None:
        if len(self.held) < _BUFFER_LIMIT:
          self.held.append(record)
        return
      self.stream.write(self.format(record) + "\n")
      self.stream.flush()
    except Exception:  # noqa: BLE001 - logging must never stop a run
      self.handleError(record)

  def open(self, path: epath.Path) -> str:
    """Start writing (appending) to `path`; returns where the lines go now."""
    if self.stream is not None:
      return self.path
    local = str(path)
    if not _is_local(path):
      local = os.path.join(tempfile.mkdtemp(prefix="deeplab_jax_log_"), path.name)
      atexit.register(self._copy_to, local, path)
    self.stream = open(local, "a", encoding="utf-8")
    self.stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                      f"{' '.join(sys.argv)}\n")
    for record in self.held:
      self.stream.write(self.format(record) + "\n")
    self.held = []
    self.stream.flush()
    self.path = local
    return local

  def _copy_to(self, local: str, remote: epath.Path) -> None:
    try:
      self.stream.flush()
      # Appending to an object store is not possible: the remote log is replaced by this run's
      # local file, which holds the earlier runs' lines only when they ran on this host.
      remote.write_text(open(local, encoding="utf-8").read())
    except Exception as e:  # noqa: BLE001 - best effort, after the run's own work
      print(f"could not copy the log {local} to {remote} ({e})", file=sys.stderr)


_log_file: _LogFile | None = None


def chief() -> bool:
  return jax.process_index() == 0


def setup(verbosity: int = 0) -> None:
  """absl's live lines only from WARNING up unless `verbosity` >= 1; every line to the log file
  (`open_log`). TensorFlow's C++ INFO lines are dropped before TensorFlow loads."""
  global _log_file
  from deeplab_jax import runtime
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if verbosity < 1:
    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging_lib.WARNING)
    handler.addFilter(_DropRoutineWarnings())
  if _log_file is None:
    _log_file = _LogFile()
    _log_file.addFilter(runtime._DropLibraryInfo())
    logging_lib.getLogger().addHandler(_log_file)


class _DropRoutineWarnings(logging_lib.Filter):
  """Library warnings that ask nothing of the user, kept in the log file only: Orbax's note that a
  save waited for the previous one (a slow disk shows in the run's speed), TFDS's note that a data
  set it is about to generate has no metadata yet."""
  _ROUTINE = ("Waiting for previous save to complete", "Variant folder %s has no")

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return not any(str(record.msg).startswith(text) for text in self._ROUTINE)


def open_log(workdir, name: str = LOG_NAME) -> str | None:
  """Start the log file in `workdir` (process k > 0: `<name>.process_k`); returns its local path."""
  if _log_file is None:
    return None
  workdir = epath.Path(workdir)
  if jax.process_index() > 0:  # its own file; on a host of its own, its own copy of the workdir
    name = f"{name}.process_{jax.process_index()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    return _log_file.open(workdir / name)
  except OSError as e:  # the run goes on; its console is process 0's
    if jax.process_index() == 0:
      raise  # process 0's folder is the run's own: an unwritable one is the user's to fix
    absl_logging.warning("process %d keeps no log file (%s)", jax.process_index(), e)
    return None


def say(line: str) -> None:
  """One console line (process 0 only), written above the progress bar if one is showing."""
  if not chief():
    return
  if Progress.active is not None and Progress.active.bar is not None:
    Progress.active.bar.write(line, file=sys.stderr)
  else:
    print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def count(n: float) -> str:
  """1.18M, 41.06M, 2,000."""
  return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{int(n):,}"


def _shows_bars() -> bool:
  """Process 0 on a terminal of some width (a pseudo-terminal with no size gets plain lines)."""
  try:
    columns = os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
  except (OSError, ValueError, AttributeError):  # no descriptor (a notebook's stream), or no size
    columns = 0
  return chief() and columns > 0


def bar(iterable, total: int | None, desc: str, unit: str):
  """A tqdm bar over `iterable` on a terminal (process 0); the iterable itself elsewhere."""
  if not _shows_bars():
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
              leave=False)


class Progress:
  """Steps `first..total`: a tqdm bar on a terminal, otherwise a line at each tenth of the run. The
  rate and ETA count from the end of the first step (which includes compiling) and include the
  evaluations between steps."""
  active: "Progress | None" = None

  def __init__(self, first: int, total: int, global_batch: int):
    self.first, self.total, self.batch = first, total, global_batch
    self.loss = None
    self.started = None  # (step, time) once the first step has finished
    self.bar = None
    if _shows_bars():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=first - 1, unit="step", file=sys.stderr, dynamic_ncols=True,
                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    span = total - first + 1
    self.every = max(1, math.ceil(span / 10))
    Progress.active = self

  def _rate(self, step: int) -> float | None:
    if self.started is None or step <= self.started[0]:
      return None
    return (step - self.started[0]) / max(time.time() - self.started[1], 1e-9)

  def update(self, step: int, loss: float | None = None) -> None:
    if loss is not None:
      self.loss = loss
    if self.started is None:
      self.started = (step, time.time())
    if not chief():
      return
    rate = self._rate(step)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      postfix = {}
      if self.loss is not None:
        postfix["loss"] = f"{self.loss:.4f}"
      if rate:
        postfix["img/s"] = f"{rate * self.batch:.1f}"
      self.bar.set_postfix(postfix, refresh=False)
      return
    if (step - self.first + 1) % self.every and step != self.total:
      return
    parts = [f"step {step:,}/{self.total:,} ({100 * step / self.total:.0f}%)"]
    if self.loss is not None:
      parts.append(f"loss {self.loss:.4f}")
    if rate:
      parts.append(f"{rate * self.batch:.1f} img/s")
      parts.append(f"ETA {duration((self.total - step) / rate)}")
    print("  ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    Progress.active = None


def eval_line(step: int, results: dict, class_names) -> str:
  """`eval at step N: mean IoU 0.6123 (weakest: grid 0.4102), pixel accuracy 0.9312`."""
  per_class = [float(v) for v in results["per_class_iou"]]
  present = [k for k, v in enumerate(per_class) if not math.isnan(v)]  # NaN: absent from the split
  weakest = min(present, key=per_class.__getitem__) if present else None
  worst = f" (weakest: {class_names[weakest]} {per_class[weakest]:.4f})" if weakest is not None else ""
  return (f"eval at step {step:,}: mean IoU {results['mean_iou']:.4f}{worst}, pixel accuracy "
          f"{results['pixel_accuracy']:.4f}")
