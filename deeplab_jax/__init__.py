"""deeplab-jax: DeepLabv3+ semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GOOGLE_NON_TPU_DEVICES = {"0x0042"}  # gVNIC, the network card of Google Cloud VMs


def _tpu_may_be_attached() -> bool:
  """A Google PCI device other than a network card, or an accelerator device node: JAX decides."""
  import glob
  import os
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        if f.read().strip() not in _GOOGLE_NON_TPU_DEVICES:
          return True
    except OSError:
      return True
  return False


def _skip_absent_tpu() -> None:
  """Keep JAX from starting a TPU backend where no TPU can be attached.

  libtpu is installed everywhere (requirements.txt: `python -m deeplab_jax.aot` compiles for TPUs
  with it), and JAX then tries a TPU backend at its first device query even on a laptop, which only
  prints libtpu's complaints about the missing slice before falling back to the CPU. Where no TPU can
  be attached, no GPU plugin is installed and JAX_PLATFORMS is unset, the CPU is the only backend
  there is: say so before any backend starts (without importing jax: the command lines restart
  under another allocator first). Anything else is left to JAX.
  """
  import importlib.util
  import os
  import sys
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if any(importlib.util.find_spec(name) is not None
         for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")):
    return
  if _tpu_may_be_attached():
    return
  if "jax" in sys.modules:  # imported first (a notebook): its configuration is read already
    from jax._src import xla_bridge
    if getattr(xla_bridge, "_backends", None):  # backends started: too late to matter
      return
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  os.environ["JAX_PLATFORMS"] = "cpu"


_skip_absent_tpu()
