"""What benchmarks/run.py and compare_torch.py measure: one config's train or inference step, as the
training loop and the predictor run it, on whatever backend is present."""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeplab_jax import allocator, sharding, train
from deeplab_jax.models import complexity, create_model, resolve_depthwise_impl, upsample_logits


def sized(config, size: int, batch: int):
  """`config` with a size x size crop and global batch `batch` for training and evaluation."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.input.crop_size = (size, size)
    config.eval.crop_size = (size, size)
    config.train.batch_size = batch
    config.eval.batch_size = batch
  return config


@dataclasses.dataclass
class Step:
  """A compiled step and the state it runs on; `run()` does one step and waits for it."""
  config: object
  mode: str
  compile_s: float
  _fn: object
  _args: tuple
  fault_counts: list = dataclasses.field(default_factory=list)  # per run, this process's minor faults

  def run(self) -> float:
    faults = page_faults()
    start = time.perf_counter()
    if self.mode == "train":
      state, metrics = self._fn(*self._args)
      jax.block_until_ready((state, metrics))
      self._args = (state,) + self._args[1:]
    else:
      jax.block_until_ready(self._fn(*self._args))
    seconds = time.perf_counter() - start
    self.fault_counts.append(page_faults() - faults)
    return seconds


def build(config, size: int, batch: int, mode: str) -> Step:
  """Initializes the model and compiles its step ("train": the training loop's jitted SGD step;
  "infer": the eval-mode forward with logits upsampled to the input, as the predictor runs it)."""
  config = sized(config, size, batch)
  mesh = sharding.create_mesh()
  sharding.check_batch(batch, mesh, "--batch")
  model, tx = create_model(config), train.create_tx(config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(int(config.seed)))
  _, state_sh, init = train.sharded_init(config, model, tx, mesh, init_rng)
  state = init(init_rng)
  rng = np.random.default_rng(0)
  batch_sh = sharding.batch_sharding(mesh)
  images = jax.device_put(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32), batch_sh)
  if mode == "train":
    labels = rng.integers(0, int(config.dataset.num_classes), (batch, size, size)).astype(np.int32)
    fn = train.jit_train_step(config, model, tx, mesh, state_sh, dropout_rng)
    args = (state, {"image": images, "label": jax.device_put(labels, batch_sh)})
  elif mode == "infer":
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    fn = jax.jit(lambda v, x: upsample_logits(model.apply(v, x, train=False), x.shape[1:3]))
    args = (variables, images)
  else:
    raise ValueError(f"--mode={mode!r}: choose train or infer")
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return Step(config, mode, time.perf_counter() - start, compiled, args)


def median_seconds(fn, *args, repeats: int = 7) -> float:
  """Median wall time of `fn(*args)` to its results being ready, after one untimed call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_gflops_per_s(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """The backend's dense matmul rate (a roofline for the convs, which are mostly 1x1 matmuls)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda a: a @ a).lower(a).compile()
  return 2 * n**3 / median_seconds(f, a, repeats=repeats) / 1e9


def peak_memory_gb() -> float:
  """Peak device memory on accelerators; the process's peak resident memory on CPU."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(step: Step, steps: int, warmup: int) -> dict:
  """The figures of issue 6 for `steps` timed steps after `warmup` untimed ones."""
  for _ in range(warmup):
    step.run()
  times = [step.run() for _ in range(steps)]
  faults = statistics.mean(step.fault_counts[-steps:])
  config, size = step.config, int(step.config.input.crop_size[0])
  batch = int(config.train.batch_size)
  gmacs = complexity.model_stats(config, size)["gmacs"]  # forward, one image
  # A train step costs about three forwards (the backward computes input and weight gradients).
  gflop = 2 * gmacs * batch * (3 if step.mode == "train" else 1)
  step_s = statistics.median(times)
  matmul = matmul_gflops_per_s(jnp.dtype(config.model.dtype))
  return {
      "mode": step.mode, "backend": jax.default_backend(), "devices": jax.device_count(),
      "depthwise_impl": depthwise_impl(config), "allocator": allocator.loaded(),
      "size": size, "batch": batch, "dtype": str(config.model.dtype),
      "compile_s": round(step.compile_s, 2), "step_s": _significant(step_s),
      "step_s_min": _significant(min(times)), "images_per_s": round(batch / step_s, 2),
      "peak_mem_gb": round(peak_memory_gb(), 2), "page_faults_per_step": round(faults),
      "gmacs": round(gmacs * batch, 2), "gflops_per_s": round(gflop / step_s, 1),
      "matmul_gflops_per_s": round(matmul, 1), "roofline_ratio": round(gflop / step_s / matmul, 3),
  }


def _significant(seconds: float, digits: int = 4) -> float:
  """Seconds to `digits` significant figures: a tiny model's 2 ms step keeps its precision."""
  return float(f"{seconds:.{digits}g}")


def depthwise_impl(config) -> str:
  """The formulation `config` runs with here ("auto" resolved for this backend)."""
  return resolve_depthwise_impl(config.model.depthwise_impl)
