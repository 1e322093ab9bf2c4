"""A memory allocator that keeps XLA:CPU's per-step scratch memory mapped (PERF_NOTES.md).

With glibc's malloc, XLA:CPU returned and re-faulted about 2.4 GB of scratch memory every Xception
train step (585k page faults, 0.85 s of kernel time). jemalloc with its default decay still purged
and re-faulted 359k pages a step (Xception-65, 257x257, batch 2: 2.33 s a step); told never to purge
(`MALLOC_CONF` below) it faulted 112 pages a step and took 1.53 s, for 0.25 GB more resident memory.
The process keeps its peak working set, which XLA re-uses every step anyway. The command lines call
`reexec_with_fast_allocator()` first thing: when jemalloc (or tcmalloc) is installed and not yet
loaded, the process restarts itself with it in LD_PRELOAD. DEEPLAB_JAX_ALLOCATOR=system opts out.
Install it with `apt install libjemalloc2` (Debian/Ubuntu) or your system's package.
Kept free of heavy imports: it runs before jax and TensorFlow are loaded.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

# Sonames in preference order; jemalloc measured best (PERF_NOTES.md).
LIBRARIES = ("jemalloc", "tcmalloc_minimal", "tcmalloc")
# Keep freed pages instead of returning them to the kernel; a user's own setting wins.
SETTINGS = {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1", "TCMALLOC_RELEASE_RATE": "0"}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")


def find() -> str | None:
  """The path of an installed fast allocator, or None."""
  for name in LIBRARIES:
    soname = ctypes.util.find_library(name)
    if soname:
      for directory in _SEARCH_DIRS:
        if os.path.exists(os.path.join(directory, soname)):
          return os.path.join(directory, soname)
      return soname  # in the loader's cache: LD_PRELOAD resolves it
  return None


def loaded() -> str:
  """The fast allocator this process runs with ("jemalloc", "tcmalloc"), or "system"."""
  preload = os.environ.get("LD_PRELOAD", "")
  for name in LIBRARIES:
    if f"lib{name}" in preload:
      return name.split("_")[0]
  return "system"


def reexec_with_fast_allocator() -> None:
  """Restart this command under the fast allocator if one is installed and not loaded (Linux)."""
  if (not sys.platform.startswith("linux") or loaded() != "system" or
      os.environ.get("DEEPLAB_JAX_ALLOCATOR") == "system" or os.environ.get("_DEEPLAB_JAX_REEXEC")):
    return
  path = find()
  if path is None:
    return
  env = SETTINGS | dict(os.environ, _DEEPLAB_JAX_REEXEC="1",
                        LD_PRELOAD=" ".join(p for p in (path, os.environ.get("LD_PRELOAD")) if p))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
