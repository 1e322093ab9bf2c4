"""The command lines restart themselves under mimalloc (installed by requirements.txt) or another fast
allocator (deeplab_jax/allocator.py)."""
import json
import os
import subprocess
import sys

import pytest

from deeplab_jax import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import json, os, resource, sys
from deeplab_jax import allocator
allocator.reexec_with_fast_allocator()
# What XLA:CPU does every step: a large buffer freed and allocated again.
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch_big():
  p = libc.malloc(64 << 20)
  ctypes.memset(p, 1, 64 << 20)
  libc.free(p)
touch_big()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  touch_big()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"loaded": allocator.loaded(), "argv": sys.argv[1:], "faults": faults,
                  "purge": os.environ.get("MIMALLOC_PURGE_DELAY")}))
"""


def run_child(tmp_path, **env):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  environ = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", "_DEEPLAB_JAX_REEXEC", "DEEPLAB_JAX_ALLOCATOR",
                          *allocator.SETTINGS)}
  result = subprocess.run([sys.executable, str(script), "--a=1", "b c"], capture_output=True,
                          text=True, env=environ | {"PYTHONPATH": REPO} | env, timeout=60)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1]) | {"stderr": result.stderr}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-exec is Linux-only")
def test_the_install_brings_mimalloc_and_commands_restart_under_it_without_page_faults(tmp_path):
  # requirements.txt installs cmeel-mimalloc: no system package is needed for the fast path.
  assert allocator.find("mimalloc") is not None, "pip install -r requirements.txt brings cmeel-mimalloc"
  out = run_child(tmp_path)
  assert out["loaded"] == "mimalloc" and out["argv"] == ["--a=1", "b c"]
  assert out["purge"] == "-1"  # never purge: freed scratch memory stays mapped
  # A 64 MiB buffer freed and re-used: 16k pages would fault each time under glibc's malloc.
  assert out["faults"] < 200, out
  system = run_child(tmp_path, DEEPLAB_JAX_ALLOCATOR="system")
  assert system["loaded"] == "system" and system["faults"] > 10_000, system
  assert run_child(tmp_path, MIMALLOC_PURGE_DELAY="10")["purge"] == "10"  # the user's setting wins


def test_opting_out_keeps_the_system_allocator(tmp_path):
  out = run_child(tmp_path, DEEPLAB_JAX_ALLOCATOR="system")
  assert out["loaded"] == "system" and out["argv"] == ["--a=1", "b c"]


def test_an_unknown_choice_warns_and_uses_the_default(tmp_path):
  out = run_child(tmp_path, DEEPLAB_JAX_ALLOCATOR="jemaloc")
  assert "DEEPLAB_JAX_ALLOCATOR='jemaloc' is not one of system" in out["stderr"]
  assert out["loaded"] == ("mimalloc" if sys.platform.startswith("linux") else "system")
