"""Several processes, one per host (TPU pod slices, GPU clusters), and preemption.

`initialize` starts JAX's distributed runtime where the job has several processes and does nothing on
one host: explicit flags (`--coordinator_address --num_processes --process_id`, GPU clusters without
SLURM), SLURM's environment (`srun`, one task per node or per GPU), or a Cloud TPU VM (JAX reads the
slice's workers from the VM's metadata). Every log line then says which process speaks.

`first_run_together` makes several CPU processes start a program's first run together (gloo's limit).

`Preemption` tells the training loop when to save and stop: a spot/preemptible VM gets SIGTERM (30 s
before it goes), and every process must checkpoint the same step. Over several processes JAX's
preemption service propagates the notice and names one step all processes reach
(`multihost_utils.reached_preemption_sync_point`); in one process a SIGTERM handler marks the next step.
"""
from __future__ import annotations

import logging as logging_lib
import os
import signal

from absl import logging
import jax

from deeplab_jax.errors import ConfigError, Preempted

PREEMPTED_EXIT = Preempted.exit_code
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _on_cloud_tpu_vm() -> bool:
  """libtpu installed and a TPU VM's metadata server answering: JAX's own test (private API)."""
  try:
    from jax._src.clusters import cloud_tpu_cluster
  except ImportError:  # pragma: no cover - JAX moved it; then only the other ways apply
    return False
  return bool(getattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)) and any(
      cls.is_env_present() for cls in (cloud_tpu_cluster.GceTpuCluster, cloud_tpu_cluster.GkeTpuCluster))


def multi_process_environment(coordinator_address=None, num_processes=None, process_id=None) -> str | None:
  """Which kind of multi-process start this is ('flags', 'slurm', 'cloud_tpu'), or None for one host."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go together (host:port "
                        "of process 0, the process count, this process's index); give all three")
    if not 0 <= int(process_id) < int(num_processes):
      raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    return "flags" if int(num_processes) > 1 else None
  if all(v in os.environ for v in _SLURM) and int(os.environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if _on_cloud_tpu_vm():
    return "cloud_tpu"
  return None


class _ProcessPrefix(logging_lib.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if not getattr(record, "_deeplab_prefixed", False):
      record.msg = f"{self._prefix}{record.msg}"
      record._deeplab_prefixed = True
    return True


def define_flags() -> None:
  """The explicit start-up flags (several processes without SLURM or a Cloud TPU VM)."""
  from absl import flags
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several processes).")
  flags.DEFINE_integer("num_processes", None, "How many processes the job has (one per host or GPU).")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def initialize_from_flags() -> str | None:
  from absl import flags
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> str | None:
  """Start the distributed runtime where needed; returns the kind of start, None on one host."""
  kind = multi_process_environment(coordinator_address, num_processes, process_id)
  if kind == "flags":
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id))
  elif kind is not None:
    jax.distributed.initialize()  # JAX finds the coordinator, count and index itself
  if kind is not None:
    logging.get_absl_handler().addFilter(
        _ProcessPrefix(f"[process {jax.process_index()}/{jax.process_count()}] "))
    logging.info("started %d processes (%s); %d devices in all, %d here", jax.process_count(), kind,
                 jax.device_count(), jax.local_device_count())
  return kind


# Coordination-service barriers: how long every process waits for the slowest to compile its program.
_TOGETHER_TIMEOUT_MS = 30 * 60 * 1000
_barriers = 0


def first_run_together(fn, what: str):
  """`fn` (jitted), whose first call over several CPU processes compiles it, waits until every process
  has, then runs: the first collective of a program opens a gloo context, and gloo gives the other
  processes 30 s to join it (fixed in jaxlib 0.10.2), so one process that compiles or reads its first
  batch 30 s later than another under load ended the run ("Gloo context initialization failed:
  DEADLINE_EXCEEDED", seen in tests/test_distributed.py on 2 cores). The coordination service's
  barrier waits much longer. One process, and TPUs and GPUs (their own collectives): `fn` as it is."""
  if jax.process_count() == 1 or jax.default_backend() != "cpu":
    return fn
  compiled = None

  def call(*args):
    nonlocal compiled
    if compiled is None:
      global _barriers
      compiled = fn.lower(*args).compile()
      _barriers += 1  # every process compiles the same programs in the same order
      from jax._src import distributed as jax_distributed  # the runtime's client (no public handle)
      jax_distributed.global_state.client.wait_at_barrier(
          f"deeplab_jax_compiled_{_barriers}", _TOGETHER_TIMEOUT_MS)
      logging.info("%s compiled on every process", what)
    return compiled(*args)

  return call


class Preemption:
  """`reached(step)`: True at the one step where every process should save and stop."""

  def __init__(self):
    self._notified = False
    self._multi = jax.process_count() > 1
    if not self._multi:  # several processes: JAX's preemption service holds SIGTERM
      try:
        self._previous = signal.signal(signal.SIGTERM, self._notice)
      except ValueError:  # not the main thread (a notebook's worker): no preemption handling
        self._previous = None

  def _notice(self, signum, frame):
    del signum, frame
    self._notified = True
    logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notified

  def close(self) -> None:
    if not self._multi and self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
