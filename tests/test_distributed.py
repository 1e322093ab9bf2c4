"""Several processes: two processes x 2 CPU devices (jax.distributed over localhost, started by
launch/local_processes.sh with the explicit flags) train like one process with 4 devices; SIGTERM to
both mid-run saves one common step and a restart ends where an uninterrupted run does."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import REPO, TINY_FLAGS, run_module
from deeplab_jax import distributed
from deeplab_jax.errors import ConfigError
from deeplab_jax.weights import init_from

STEPS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _flags(data_dir, workdir):
  return ["--config=configs/shapes.py", f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          f"--config.train.steps={STEPS}", *TINY_FLAGS, "--config.train.batch_size=4",
          "--config.checkpoint.every_steps=4", "--config.eval.every_steps=100",
          # BatchNorm on moving statistics: with batch statistics over 4 tiny images, float32
          # summation order alone moves this random network's gradient by 0.6% (one process: 1, 2 and
          # 4 devices give gradient norms 1.769, 1.771, 1.782), which 8 steps at lr 0.1 amplify; no
          # comparison across device layouts can then hold 1e-5. BatchNorm statistics over several
          # processes are checked on their own (test_input_pipeline's two-process test).
          "--config.model.freeze_bn=True"]


def _two_processes(flags, env):
  """launch/local_processes.sh 2 ... on CPU: two processes with 2 devices each."""
  env = dict(os.environ, **env, PORT=str(_free_port()), GPUS_PER_PROCESS="0", PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(["bash", os.path.join(REPO, "launch", "local_processes.sh"), "2", *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _report(out: str, log) -> str:
  """A failure's story: the first error lines of both processes (the cause; the tail holds only its
  consequences, e.g. the peer's lost connection), then the tail. The whole output goes to `log`."""
  log.write_text(out)
  first = [line for line in out.splitlines()
           if line[:1] in "EF" and line[1:5].isdigit() or "Error" in line or "error:" in line][:12]
  return "\n".join(["first error lines:", *first, f"... tail ({log} has all):", out[-2500:]])


def _lost_connection(out: str) -> str | None:
  """The distributed runtime's transport failures (not deeplab_jax's): the first one named."""
  return next((sign for sign in ("grpc_message:\"Socket closed\"", "Connection reset by peer")
               if sign in out), None)


def _params(workdir):
  tree, info = init_from._load_workdir(workdir)
  return tree, info["step"]


@pytest.mark.reliability
def test_two_processes_preempted_and_resumed_end_like_one_process_with_four_devices(
    tiny_data_dir, compile_cache_env, tmp_path):
  """SIGTERM to both processes once they train: one common step saved, exit 143; the restart (two
  processes again) ends with the parameters of an uninterrupted run of one process with 4 devices.
  (Resuming is exact, tests/test_train.py; one uninterrupted two-process run more would add a minute
  to the suite.)"""
  workdir = tmp_path / "two_processes"
  flags = _flags(tiny_data_dir, workdir)
  job = _two_processes(flags, compile_cache_env)
  lines = []
  for line in job.stdout:  # SIGTERM once both processes train: process 0 prints, process 1 logs
    lines.append(line)
    if "training steps" in line:
      other_log, deadline = workdir / "train.log.process_1", time.time() + 120
      while time.time() < deadline and not (other_log.exists() and
                                            "training steps" in other_log.read_text()):
        time.sleep(0.05)
      time.sleep(0.5)
      job.send_signal(signal.SIGTERM)
      break
  rest, _ = job.communicate(timeout=300)
  out = "".join(lines) + rest
  assert job.returncode == distributed.PREEMPTED_EXIT, _report(out, tmp_path / "preempted.log")
  assert "[process 1/2]" in out and "4 cpu devices (mesh data=4, 2 processes)" in out
  # Each process's details go to its own log file in the workdir; only process 0 prints the console.
  assert "started 2 processes (flags); 4 devices in all, 2 here" in (workdir / "train.log").read_text()
  assert "started 2 processes" in (workdir / "train.log.process_1").read_text()
  assert out.count("training steps 1..") == 1, out
  stops = [line for line in out.splitlines() if "deeplab_jax: preempted (SIGTERM) at step" in line]
  assert len(stops) == 2 and len({line.split(" at step ")[1].split(":")[0] for line in stops}) == 1, stops
  _, step = _params(workdir)
  assert 0 < step < STEPS, step
  assert not (workdir / "final_metrics.json").exists()

  job = _two_processes(flags, compile_cache_env)  # the restart resumes from that step
  out, _ = job.communicate(timeout=600)
  starts = 2
  if job.returncode != 0 and (lost := _lost_connection(out)):
    # Seen in full suites on 2 cores: process 0's first collective of the train step waited 30 s
    # (gloo's fixed limit) for process 1, still compiling under load ("Gloo context initialization
    # failed: DEADLINE_EXCEEDED"), then both aborted with these transport errors. train.py now
    # compiles each step and waits at the coordination service before its first run
    # (distributed.first_run_together; checked by hand with one process 40 s late). Kept for a drop
    # of the coordination service itself (jax-ml/jax#19596 reports one on real hosts): a user
    # restarts then, and the run must still end exactly where an uninterrupted one does.
    (tmp_path / "restart_lost_connection.log").write_text(out)
    warnings.warn(f"the two-process restart lost its connection ({lost}); "
                  f"restarted once more")
    job, starts = _two_processes(flags, compile_cache_env), 3
    out, _ = job.communicate(timeout=600)
  assert job.returncode == 0, _report(out, tmp_path / "restart.log")
  ours, final_step = _params(workdir)
  # Process 0 alone writes the run's files: final_metrics.json, one event file per start.
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == STEPS == final_step
  assert len(list(workdir.glob("events.out.tfevents.*"))) in {2, starts}  # a lost start may not have one

  single = tmp_path / "one_process"
  result = run_module(["deeplab_jax.main", *_flags(tiny_data_dir, single)],
                      env={**compile_cache_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert result.returncode == 0, result.stderr[-3000:]
  want, want_step = _params(single)
  assert want_step == STEPS and set(ours) == set(want)
  worst = max(float(np.max(np.abs(ours[k] - want[k]))) for k in want)
  assert worst <= 1e-5, worst


def test_multi_process_flags_go_together_and_one_host_starts_nothing(monkeypatch):
  for name in ("SLURM_JOB_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.multi_process_environment() is None
  assert distributed.multi_process_environment("localhost:1234", 1, 0) is None
  assert distributed.multi_process_environment("localhost:1234", 2, 1) == "flags"
  with pytest.raises(ConfigError, match="go together"):
    distributed.multi_process_environment("localhost:1234", 2, None)
  with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.multi_process_environment("localhost:1234", 2, 2)
  for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "16",
                      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.multi_process_environment() == "slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.multi_process_environment() is None
