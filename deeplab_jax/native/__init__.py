"""The optional native depthwise kernel (`depthwise.cc`), compiled by the package's install.

`pip install -e .` (or `pip install .`) builds `_depthwise*.so` beside this file when a C++ compiler is
present (setup.py); without it everything runs on the pure-JAX formulations, and `unavailable_reason()`
says why the kernel is not used.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import jax

VERSION = 1  # must equal kVersion in depthwise.cc
TARGETS = {"forward": "DeepLabDepthwiseForward", "input_grad": "DeepLabDepthwiseInputGrad",
           "filter_grad": "DeepLabDepthwiseFilterGrad"}


def target_name(kind: str) -> str:
  return f"deeplab_depthwise_{kind}"


@functools.cache
def _load() -> str | None:
  """Registers the kernels with XLA:CPU once; returns None on success, else the reason it failed."""
  found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_depthwise*.so")))
  if not found:
    return ("the native depthwise kernel is not built; reinstall with a C++ compiler present "
            "(pip install -e .)")
  try:
    library = ctypes.CDLL(found[0])
    library.DeepLabDepthwiseVersion.restype = ctypes.c_int64
    if library.DeepLabDepthwiseVersion() != VERSION:
      return f"{found[0]} was built from another depthwise.cc; reinstall (pip install -e .)"
    for kind, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target_name(kind), jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, AttributeError) as e:
    return f"{found[0]} did not load ({e}); reinstall (pip install -e .)"
  return None


def available() -> bool:
  return _load() is None


def unavailable_reason() -> str | None:
  return _load()
