"""Builds the optional native depthwise kernel; everything else about the package is in pyproject.toml.

The kernel is a plain shared library that XLA calls through FFI (deeplab_jax/native/depthwise.cc),
compiled against the XLA FFI headers that jaxlib ships. A failed build is not an install failure: the
package then runs its pure-JAX depthwise formulations, and deeplab_jax.native says why.
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _jaxlib_include() -> str | None:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "include")
  return path if os.path.isdir(os.path.join(path, "xla", "ffi", "api")) else None


class OptionalBuildExt(build_ext):
  def build_extension(self, ext):
    include = _jaxlib_include()
    if include is None:
      print("deeplab_jax: jaxlib's XLA FFI headers not found; the native depthwise kernel is not built",
            file=sys.stderr)
      return
    ext.include_dirs.append(include)
    try:
      super().build_extension(ext)
    except Exception as e:  # no compiler, old compiler: fall back to pure JAX, loudly
      print(f"deeplab_jax: the native depthwise kernel did not build ({e}); the pure-JAX depthwise "
            f"formulations will be used", file=sys.stderr)


setup(
    ext_modules=[Extension(
        "deeplab_jax.native._depthwise",
        sources=["deeplab_jax/native/depthwise.cc"],
        language="c++",
        # Built where it runs (pip builds from source), so it may use this CPU's vector units.
        extra_compile_args=["-std=c++17", "-O3", "-march=native", "-Wno-attributes",
                            "-Wno-return-type"],
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
