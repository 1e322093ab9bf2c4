"""A memory allocator that keeps XLA:CPU's per-step scratch memory mapped (PERF_NOTES.md).

With glibc's malloc, XLA:CPU returns its scratch memory to the kernel after every step and faults it
in again: Xception-65 DeepLabv3+, 257x257, batch 2, 2-core AVX-512 Xeon, 337k page faults and 1.31 s
a step. Under mimalloc told never to purge: 0 faults, 1.02 s (jemalloc never purging: 263 faults,
1.02 s). glibc's own tunables do not get there: `arena_max=1:mmap_max=0:trim_threshold=...` removed
the faults but took 1.23 s, `hugetlb=1` 1.12 s, and `mmap_threshold` cannot exceed 32 MiB
(benchmarks/README.md has the table).

mimalloc comes from PyPI (`cmeel-mimalloc`, in requirements.txt), so `pip install` brings it and no
system package is needed; a system jemalloc or tcmalloc is the fallback where that wheel is missing.
The command lines call `reexec_with_fast_allocator()` first thing: when the process does not run
under one yet, it restarts itself with it in LD_PRELOAD. DEEPLAB_JAX_ALLOCATOR=system opts out;
=mimalloc, =jemalloc or =tcmalloc picks one. Kept free of heavy imports: it runs before jax and
TensorFlow are loaded.
"""
from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import sys

# Preference order: the wheel first, so every install gets the same one; all three measured alike.
LIBRARIES = ("mimalloc", "jemalloc", "tcmalloc_minimal", "tcmalloc")
# Keep freed pages instead of returning them to the kernel; a user's own setting wins.
SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
            "TCMALLOC_RELEASE_RATE": "0"}
_WHEEL = ("cmeel-mimalloc", "cmeel.prefix/lib/libmimalloc.so")
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")


def _from_wheel() -> str | None:
  try:
    path = importlib.metadata.distribution(_WHEEL[0]).locate_file(_WHEEL[1])
  except importlib.metadata.PackageNotFoundError:
    return None
  return os.path.realpath(path) if os.path.exists(path) else None


def _from_system(name: str) -> str | None:
  soname = ctypes.util.find_library(name)
  if not soname:
    return None
  for directory in _SEARCH_DIRS:
    if os.path.exists(os.path.join(directory, soname)):
      return os.path.join(directory, soname)
  return soname  # in the loader's cache: LD_PRELOAD resolves it


def find(choice: str | None = None) -> str | None:
  """The path of an installed fast allocator (`choice`, or the first of LIBRARIES found), or None."""
  for name in (choice,) if choice else LIBRARIES:
    path = (_from_wheel() or _from_system(name)) if name == "mimalloc" else _from_system(name)
    if path:
      return path
  return None


def loaded() -> str:
  """The fast allocator this process runs with ("mimalloc", "jemalloc", "tcmalloc"), or "system"."""
  preload = os.environ.get("LD_PRELOAD", "")
  for name in LIBRARIES:
    if f"lib{name}" in preload:
      return name.split("_")[0]
  return "system"


def reexec_with_fast_allocator() -> None:
  """Restart this command under the fast allocator if one is installed and not loaded (Linux)."""
  choice = os.environ.get("DEEPLAB_JAX_ALLOCATOR") or None
  if (not sys.platform.startswith("linux") or loaded() != "system" or choice == "system" or
      os.environ.get("_DEEPLAB_JAX_REEXEC")):
    return
  if choice not in (None, *LIBRARIES):
    print(f"deeplab_jax: warning: DEEPLAB_JAX_ALLOCATOR={choice!r} is not one of system, "
          f"{', '.join(LIBRARIES)}; using the default", file=sys.stderr)
    choice = None
  path = find(choice)
  if path is None:
    return
  env = SETTINGS | dict(os.environ, _DEEPLAB_JAX_REEXEC="1",
                        LD_PRELOAD=" ".join(p for p in (path, os.environ.get("LD_PRELOAD")) if p))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
