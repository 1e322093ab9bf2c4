"""The command lines restart themselves under jemalloc when it is installed (deeplab_jax/allocator.py)."""
import json
import os
import subprocess
import sys

import pytest

from deeplab_jax import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import json, os, sys
from deeplab_jax import allocator
allocator.reexec_with_fast_allocator()
print(json.dumps({"loaded": allocator.loaded(), "argv": sys.argv[1:], "pid": os.getpid(),
                  "conf": os.environ.get("MALLOC_CONF")}))
"""


def run_child(tmp_path, **env):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_DEEPLAB_JAX_REEXEC")}
  result = subprocess.run([sys.executable, str(script), "--a=1", "b c"], capture_output=True,
                          text=True, env=environ | {"PYTHONPATH": REPO} | env, timeout=60)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_restarts_under_the_installed_allocator_with_the_same_arguments(tmp_path):
  if allocator.find() is None:
    pytest.skip("no jemalloc or tcmalloc installed here (apt install libjemalloc2)")
  out = run_child(tmp_path)
  assert out["loaded"] in ("jemalloc", "tcmalloc")
  assert out["argv"] == ["--a=1", "b c"]
  assert out["conf"] == allocator.SETTINGS["MALLOC_CONF"]  # never purge: no per-step page faults
  assert run_child(tmp_path, MALLOC_CONF="narenas:2")["conf"] == "narenas:2"  # the user's wins


def test_opting_out_keeps_the_system_allocator(tmp_path):
  out = run_child(tmp_path, DEEPLAB_JAX_ALLOCATOR="system")
  assert out["loaded"] == "system" and out["argv"] == ["--a=1", "b c"]
