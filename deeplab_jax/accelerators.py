"""The accelerators the project plans for: one table of their figures, and abstract devices of a slice.

`CHIPS` holds each chip's published peak bf16 FLOP/s, HBM bandwidth and capacity (with the page they
come from) and the HBM a program may use as the compiler counts it. `parse(name)` reads a slice's name
as libtpu writes it ("v5e:2x2", "v4:2x2x2"), as Cloud TPU's accelerator types do ("v5litepod-8",
"v4-16", "v5p-8", "v3-8") or as GPUs per host ("h100:8", "a100:2x8"); `devices(target)` gives the
slice's devices for `jax.jit(...).lower(...).compile()` to compile for on this machine: libtpu (TPUs)
or JAX's CUDA plugin (GPUs) compiles, nothing runs, no accelerator is attached (deeplab_jax.aot).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from deeplab_jax.errors import ConfigError, UserError

GIB = 2**30


class MissingCompilerError(UserError):
  """The compiler for the named platform (libtpu, the CUDA plugin) is not installed."""
  exit_code = 2


@dataclasses.dataclass(frozen=True)
class Chip:
  """Figures per chip. A JAX device is one chip, except on v2/v3 where it is one of 2 TensorCores."""
  name: str
  platform: str  # "tpu" | "gpu"
  device_kind: str  # jax Device.device_kind of its devices
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: float  # as published
  usable_hbm_bytes: float  # what one program may use: libtpu's "available HBM" (0.0.42.1), JAX's GPU share
  devices_per_chip: int
  source: str

  @property
  def ridge(self) -> float:
    """FLOP per byte of HBM traffic above which a step is bound by compute, below by memory."""
    return self.peak_flops / self.hbm_bandwidth


# Peak, bandwidth and capacity as Google and NVIDIA publish them. Usable HBM per chip on TPUs is what
# libtpu 0.0.42.1 reports as "available HBM" when a program does not fit (per TensorCore on v2/v3,
# doubled here); on GPUs JAX preallocates 75% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
CHIPS = {
    "v2": Chip("v2", "tpu", "TPU v2", 45e12, 600e9, 16 * GIB, 2 * 7.48 * GIB, 2,
               "https://cloud.google.com/tpu/docs/v2"),
    "v3": Chip("v3", "tpu", "TPU v3", 123e12, 900e9, 32 * GIB, 2 * 15.48 * GIB, 2,
               "https://cloud.google.com/tpu/docs/v3"),
    "v4": Chip("v4", "tpu", "TPU v4", 275e12, 1200e9, 32 * GIB, 30.75 * GIB, 1,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 197e12, 819e9, 16 * GIB, 15.75 * GIB, 1,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "tpu", "TPU v5", 459e12, 2765e9, 95 * GIB, 95.74 * GIB, 1,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 918e12, 1640e9, 32 * GIB, 31.25 * GIB, 1,
                "https://cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 989e12, 3.35e12, 80 * GIB, 0.75 * 84978434048, 1,
                 "https://www.nvidia.com/en-us/data-center/h100/ (SXM5, dense bf16)"),
    "a100": Chip("a100", "gpu", "NVIDIA A100-SXM4-80GB", 312e12, 2.039e12, 80 * GIB, 0.75 * 85093745664, 1,
                 "https://www.nvidia.com/en-us/data-center/a100/ (SXM4 80GB, dense bf16)"),
}

# Cloud TPU accelerator-type prefixes: the number after them counts TensorCores ("cores") or chips.
_ACCELERATOR_TYPES = {"v2": ("v2", "cores"), "v3": ("v3", "cores"), "v4": ("v4", "cores"),
                      "v5p": ("v5p", "cores"), "v5litepod": ("v5e", "chips"), "v5e": ("v5e", "chips"),
                      "v6e": ("v6e", "chips")}
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
       256: (16, 16), 512: (16, 32), 1024: (32, 32)}
_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
       256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
EXAMPLES = "v5e:2x2, v5litepod-8, v4-8, v4:2x2x2, v5p-8, v3-8, v6e-8 or h100:8"


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice: `chips` chips of `chip` on `hosts` hosts, `topology` in the compiler's own words."""
  name: str
  chip: Chip
  topology: str
  chips: int
  hosts: int
  options: tuple = ()  # keyword arguments of get_topology_desc, as (key, value) pairs

  @property
  def devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def accelerator_type(self) -> str:
    """Cloud TPU's name of the slice (what `gcloud ... --accelerator-type` takes)."""
    generation = self.chip.name
    if generation in ("v5e", "v6e"):
      return f"{'v5litepod' if generation == 'v5e' else generation}-{self.chips}"
    return f"{generation}-{2 * self.chips}"  # counted in TensorCores


def parse(name: str) -> Target:
  """The slice `name` stands for; a ConfigError naming the accepted forms if it stands for none."""
  text = name.strip().lower()
  gpu = re.fullmatch(r"(h100|a100):(?:(\d+)x)?(\d+)", text)
  if gpu:
    hosts, per_host = int(gpu[2] or 1), int(gpu[3])
    if hosts < 1 or per_host < 1:
      raise ConfigError(f"--topology={name}: GPUs are HOSTSxGPUS_PER_HOST, e.g. h100:8 or h100:2x8")
    return Target(name, CHIPS[gpu[1]], f"1x{hosts}x{per_host}", hosts * per_host, hosts)
  accelerator = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", text)
  if accelerator:
    generation, unit = _ACCELERATOR_TYPES[accelerator[1]]
    count = int(accelerator[2])
    chips = count // 2 if unit == "cores" else count
    shapes = _3D if generation in ("v4", "v5p") else _2D
    if chips not in shapes or (unit == "cores" and count % 2):
      raise ConfigError(f"--topology={name} is not a slice this command knows; give its shape, e.g. "
                        f"{generation}:{'x'.join(map(str, shapes[8 if 8 in shapes else 4]))}")
    return _tpu(name, generation, shapes[chips])
  topology = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", text)
  if topology:
    generation, dims = topology[1], tuple(int(d) for d in topology[2].split("x"))
    if len(dims) != (3 if generation in ("v4", "v5p") else 2) or min(dims) < 1:
      raise ConfigError(f"--topology={name}: {generation} slices are "
                        f"{'AxBxC' if generation in ('v4', 'v5p') else 'AxB'} chips, e.g. "
                        f"{'v4:2x2x1' if generation in ('v4', 'v5p') else 'v5e:2x2'}")
    return _tpu(name, generation, dims)
  raise ConfigError(f"--topology={name!r} is not a slice name; use e.g. {EXAMPLES}")


def _tpu(name: str, generation: str, dims: tuple[int, ...]) -> Target:
  chips = math.prod(dims)
  options = []
  if generation in ("v4", "v5p"):
    options.append(("chip_config_name", "megacore"))  # one JAX device per chip, as on Cloud TPU VMs
  if generation in ("v5e", "v6e") and chips <= 8:
    # Their VMs of up to 8 chips are one host; larger slices are hosts of 4 chips (2x2).
    options.append(("chips_per_host_bounds", (dims[0], dims[1], 1)))
    hosts = 1
  else:
    hosts = max(1, chips // 4)
  return Target(name, CHIPS[generation], f"{generation}:{'x'.join(map(str, dims))}", chips, hosts,
                tuple(options))


# What the compiler of each GPU needs to know of it (an XLA GpuTargetConfigProto, from NVIDIA's
# published figures): without it, a GPU compile needs a GPU attached.
_GPU_TARGET = {
    "h100": dict(cc_major=9, cores=132, shared_per_core=233472, shared_per_block_optin=232448,
                 bandwidth=3352320000000, l2=52428800, clock=1.98, memory=84978434048),
    "a100": dict(cc_major=8, cores=108, shared_per_core=167936, shared_per_block_optin=166912,
                 bandwidth=2039000000000, l2=41943040, clock=1.41, memory=85093745664),
}


def _gpu_target_config(chip: Chip) -> str:
  t = _GPU_TARGET[chip.name]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {t['shared_per_core']}
  threads_per_core_limit: 2048
  core_count: {t['cores']}
  fpus_per_core: {128 if t['cc_major'] >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {t['bandwidth']}
  l2_cache_size: {t['l2']}
  clock_rate_ghz: {t['clock']}
  device_memory_size: {t['memory']}
  shared_memory_per_block_optin: {t['shared_per_block_optin']}
  cuda_compute_capability {{ major: {t['cc_major']} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.device_kind}"
"""


def quiet_libtpu_environment(target: Target) -> None:
  """libtpu as a compiler only, beside anything else on this machine: no TPU lookup on a metadata
  server, no lock on the (absent) chips, so tests on two workers and a training process on a TPU VM
  can compile at the same time. Read when libtpu loads: call before the first TPU topology."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Target) -> list:
  """The slice's abstract devices, in the compiler's order (what a Mesh of the slice holds)."""
  from jax.experimental import topologies
  import jax
  if target.chip.platform == "tpu":
    quiet_libtpu_environment(target)
    try:
      import libtpu  # noqa: F401  (only to say how to get it)
    except ImportError:
      raise MissingCompilerError(
          'libtpu (the TPU compiler) is not installed; pip install "jax[tpu]==0.10.2" (Linux x86-64), '
          'or reinstall requirements.txt') from None
    try:
      found = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                           **dict(target.options)).devices
    except jax.errors.JaxRuntimeError as e:
      raise ConfigError(f"--topology={target.name}: libtpu does not know {target.topology} "
                        f"({str(e).splitlines()[0][:160]}); use e.g. {EXAMPLES}") from None
  else:
    try:
      found = topologies.get_topology_desc(platform="cuda", topology_name=target.topology,
                                           topology=target.topology,
                                           target_config=_gpu_target_config(target.chip)).devices
    except (NotImplementedError, RuntimeError) as e:
      raise MissingCompilerError(
          f'JAX\'s CUDA plugin (the GPU compiler) is not available ({str(e).splitlines()[0][:120]}); '
          f'pip install "jax[cuda12]==0.10.2" (Linux x86-64, about 5 GB with its CUDA libraries); '
          f'without a GPU driver it loads only in a process started with JAX_PLATFORMS=cpu, as '
          f'python -m deeplab_jax.aot is') from None
  if len(found) != target.devices:
    raise ConfigError(f"--topology={target.name}: the compiler made {len(found)} devices of "
                      f"{target.topology}, not {target.devices}; give the slice's shape, e.g. v5e:2x2")
  return list(found)
