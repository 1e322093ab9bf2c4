"""Rehearse a run on a TPU slice or GPUs before paying for it: compile its train and eval steps here.

  python -m deeplab_jax.aot --config=configs/voc_xception.py --topology=v5e:2x2
  python -m deeplab_jax.aot --config=configs/voc_xception.py --topology=v4-8 --config.model.dtype=bfloat16

The steps are training's own (`train.jit_train_step`, `train.jit_eval_step`), over the project's mesh and
shardings, for the abstract devices of the named slice (deeplab_jax.accelerators): libtpu compiles for
any TPU topology on this CPU, multi-host ones included; JAX's CUDA plugin, where installed, for GPUs.
Nothing runs. Per chip it reports the compiler's memory assignment against the chip's usable HBM, the
largest global batch that fits (found by compiling), and a roofline prediction of the step: the longer
of FLOPs / peak and bytes accessed / HBM bandwidth, from the compiler's cost analysis and the chip's
published figures. A short table, then one JSON object as the last line. A config that does not fit
ends with a line naming the largest batch that does, and exit code 2.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # the local backend compiles nothing: keep it off any attached TPU or GPU
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import json
import re
import time

from absl import flags, logging

from deeplab_jax import accelerators, runtime
from deeplab_jax.errors import ConfigError

STEPS = ("train", "eval")
_COLLECTIVE = re.compile(
    r"= [^=\n]*?\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")
_NEEDED = re.compile(r"required for HLO temporaries \(([\d.]+)G\)")


class DoesNotFitError(ConfigError):
  """The config's batch does not fit the slice's memory."""


@dataclasses.dataclass
class Compiled:
  """One step compiled for one global batch; memory and costs per device, as the compiler counts."""
  step: str
  global_batch: int
  compile_s: float
  fits: bool
  memory: dict | None = None  # bytes: arguments, outputs, aliased, temporaries, code, peak
  flops: float = 0.0
  bytes_accessed: float = 0.0
  xla_seconds: float | None = None  # the compiler's own estimate, where it gives a positive one
  collectives: dict | None = None
  needed_gib: float | None = None  # what a program that does not fit asked for (the compiler's words)
  hlo: str | None = dataclasses.field(default=None, repr=False)  # the optimized program, per device


def _batch_field(config, step: str):
  """config.train or config.eval: where `step`'s global batch size is."""
  return config.train if step == "train" else config.eval


def from_summary(summary_: dict, target: accelerators.Target, step: str) -> Compiled:
  """The Compiled that `summary` described (what a search needs of it), from a result's JSON."""
  devices = target.devices
  if not summary_["fits"]:
    needed = summary_.get("peak_memory_per_chip_gib")
    return Compiled(step, summary_["global_batch"], summary_["compile_s"], fits=False,
                    needed_gib=None if needed is None else needed / target.chip.devices_per_chip)
  images = summary_["global_batch"] / devices
  return Compiled(step, summary_["global_batch"], summary_["compile_s"], fits=True,
                  memory=summary_["memory_per_device_bytes"],
                  flops=summary_["flops_per_image"] * images,
                  bytes_accessed=summary_["bytes_per_image"] * images,
                  xla_seconds=summary_.get("xla_predicted_step_s"),
                  collectives=summary_["collectives"])


def _with_batch(config, step: str, global_batch: int):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    _batch_field(config, step).batch_size = int(global_batch)
  return config


def compile_step(config, mesh, step: str, global_batch: int) -> Compiled:
  """Compile training's `step` ("train" or "eval") of `config` at `global_batch` for `mesh`'s devices."""
  fn, args = step_program(config, mesh, step, global_batch)
  return compile_and_measure(fn, args, step, global_batch)


def step_program(config, mesh, step: str, global_batch: int):
  """(jitted function, abstract arguments with their shardings) of training's `step`: what the
  training loop runs, for `mesh`'s devices."""
  import jax
  from deeplab_jax import input_pipeline, sharding, train
  config = _with_batch(config, step, global_batch)
  model, tx = train.model_for_mesh(config, mesh), train.create_tx(config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(int(config.seed)))
  abstract, state_sh, _ = train.sharded_init(config, model, tx, mesh, init_rng)
  state = sharding.with_shardings(abstract, state_sh)
  batch_sh = sharding.batch_sharding(mesh)
  if step == "train":
    fn = train.jit_train_step(config, model, tx, mesh, state_sh, dropout_rng)
    spec = input_pipeline.train_batch_spec(config)
    args = (state,)
  else:
    fn = train.jit_eval_step(config, mesh, state_sh)
    spec = input_pipeline.eval_batch_spec(config)
    args = (state.params, state.batch_stats)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in spec.items()}
  return fn, (*args, batch)


def model_flops_per_image(config, mesh, step: str) -> float:
  """The model's FLOPs per image in `step`: 3 forwards for a train step (the forward, and the
  gradients of the activations and of the weights), 1 for eval, counted by XLA's cost analysis on
  the forward before optimization. The compiled step's own count includes what remat recomputes,
  and on GPUs it hides convolutions in library calls (or counts the grouped convolutions' weight
  gradients as dense ones before optimization): MFU counts these FLOPs instead."""
  import functools
  import jax
  import jax.numpy as jnp
  from deeplab_jax import train
  if step == "train":
    model, crop = train.model_for_mesh(config, mesh), config.input.crop_size
  else:
    model = train.model_for_mesh(config, mesh, config.eval.output_stride)
    crop = config.eval.crop_size
  image = jax.ShapeDtypeStruct((1, int(crop[0]), int(crop[1]), 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image)
  return _flops_before_optimization(lowered) * (3 if step == "train" else 1)


# Without a GPU attached, XLA cannot autotune its Triton matmul tilings (it fails on the logits'
# resize); cuBLAS matmuls need no tuning at compile time.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compile_and_measure(fn, args, step: str, global_batch: int) -> Compiled:
  """Compile the jitted `fn` for the abstract `args`; a program that does not fit the device's
  memory (the compiler refuses it) is a Compiled with fits=False and what it asked for."""
  import jax
  platform = _platform(args)
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile(GPU_COMPILER_OPTIONS if platform == "gpu" else None)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = _NEEDED.search(str(e))
    return Compiled(step, global_batch, time.perf_counter() - start, fits=False,
                    needed_gib=float(needed[1]) if needed else None)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  memory["peak"] = max(int(getattr(m, "peak_memory_in_bytes", 0) or 0),
                       memory["arguments"] + memory["outputs"] - memory["aliased"] +
                       memory["temporaries"] + memory["code"])
  costs = _costs(compiled)
  optimal = costs.get("optimal_seconds")
  text = compiled.as_text()
  return Compiled(step, global_batch, seconds, fits=True, memory=memory,
                  flops=float(costs.get("flops", 0.0)), bytes_accessed=float(costs.get("bytes accessed", 0.0)),
                  xla_seconds=float(optimal) if optimal and optimal > 0 else None,
                  collectives=collectives(text), hlo=text)


def _platform(args) -> str:
  import jax
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      return next(iter(sharding.device_set)).platform
  return jax.default_backend()


def _costs(compiled) -> dict:
  """The compiler's cost analysis. GPU executables have none: XLA's analysis of the optimized module
  is run by the CPU client, for its bytes (its FLOPs leave out the library calls)."""
  costs = compiled.cost_analysis()
  if costs:
    return costs[0] if isinstance(costs, list) else costs
  costs = _cpu_cost_analysis(compiled.runtime_executable().hlo_modules()[0])
  costs.pop("flops", None)  # see model_flops_per_image; summary() uses the model's FLOPs instead
  costs.pop("optimal_seconds", None)
  return costs


def _cpu_cost_analysis(module) -> dict:
  """XLA's cost analysis of an HLO module for any backend, run by the CPU client (it counts shapes)."""
  import jax
  from jax._src.lib import xla_client
  return dict(xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def _flops_before_optimization(lowered) -> float:
  return float(_cpu_cost_analysis(lowered.compiler_ir("hlo").get_hlo_module())["flops"])


def collectives(hlo_text: str) -> dict[str, int]:
  """{kind: count} of the collectives in an optimized HLO module (an async pair counts once)."""
  counts: dict[str, int] = {}
  for kind in _COLLECTIVE.findall(hlo_text):
    counts[kind] = counts.get(kind, 0) + 1
  return dict(sorted(counts.items()))


def max_global_batch(config, mesh, step: str, known: list[Compiled], limit: int, usable_gib: float,
                     report=None) -> tuple[int, Compiled | None]:
  """The largest global batch (a multiple of the device count) whose `step` compiles within the
  chip's HBM, found by compiling, and its compile; `known` holds compiles already done (reused).
  Memory grows about linearly with the batch, so the search probes where a line through the two
  largest compiles reaches the usable HBM; where that line undershoots (at large batches the
  compiler fits more than its memory figures suggest: a creep of one example per device per compile
  otherwise), it doubles, then bisects. (0, None) if not one example per device fits."""
  n = mesh.size
  fits = {c.global_batch // n: c for c in known}

  def probe(per_device: int) -> bool:
    if per_device not in fits:
      fits[per_device] = compile_step(config, mesh, step, per_device * n)
      if report:
        report(fits[per_device])
    return fits[per_device].fits

  def peak(c: Compiled) -> float | None:
    if c.fits:
      return c.memory["peak"] / accelerators.GIB
    return c.needed_gib

  lo, hi = 0, limit + 1  # lo fits (0: trivially), hi does not
  for b, c in fits.items():
    if c.fits:
      lo = max(lo, b)
    else:
      hi = min(hi, b)
  if lo == 0 and not probe(1):
    return 0, None
  lo, checked_next = max(lo, 1), False
  while hi - lo > 1:
    points = sorted((b, peak(c)) for b, c in fits.items() if peak(c) is not None)
    guess = None
    if len(points) >= 2:
      (b0, m0), (b1, m1) = points[-2], points[-1]
      slope = (m1 - m0) / (b1 - b0) if b1 != b0 else 0
      if slope > 0:
        guess = int(b1 + (usable_gib - m1) / slope)
    if guess is not None and guess > lo:  # the line's answer, inside (lo, hi)
      mid = min(guess, hi - 1)
    elif guess == lo and not checked_next:  # the line says lo is the answer: check lo + 1, once
      mid, checked_next = lo + 1, True
    elif hi > limit:  # no misfit yet, and no line or one that undershoots what fits: double
      mid = min(2 * lo, hi - 1)
    else:  # the line undershoots (the compiler fits more than its memory figures suggest): bisect
      mid = (lo + hi) // 2
    if probe(mid):
      lo = mid
    else:
      hi = mid
  return lo * n, fits[lo]


def summary(c: Compiled, target: accelerators.Target, max_batch: int | None,
            model_flops: float) -> dict:
  """What the JSON line says of one step: per chip, per image, the roofline prediction from the
  compiled program's FLOPs (the model's where the compiler gives none) and bytes; MFU counts
  `model_flops` per image (model_flops_per_image)."""
  chip, n = target.chip, target.devices
  per_chip = chip.devices_per_chip
  out = {"global_batch": c.global_batch, "fits": c.fits, "compile_s": round(c.compile_s, 1),
         "hbm_per_chip_gib": round(chip.hbm_bytes / accelerators.GIB, 2),
         "usable_hbm_per_chip_gib": round(chip.usable_hbm_bytes / accelerators.GIB, 2),
         "max_global_batch": max_batch}
  if not c.fits:
    out["peak_memory_per_chip_gib"] = None if c.needed_gib is None else round(c.needed_gib * per_chip, 2)
    return out
  peak_flops, bandwidth = chip.peak_flops / per_chip, chip.hbm_bandwidth / per_chip
  images = c.global_batch / n  # per device
  flops = c.flops or model_flops * images
  step_s = max(flops / peak_flops, c.bytes_accessed / bandwidth)
  out.update({
      "peak_memory_per_chip_gib": round(c.memory["peak"] * per_chip / accelerators.GIB, 2),
      "memory_per_device_bytes": c.memory,
      "flops_per_image": flops / images,
      "model_flops_per_image": model_flops,
      "bytes_per_image": c.bytes_accessed / images,
      "flop_per_byte": round(flops / c.bytes_accessed, 2) if c.bytes_accessed else None,
      "bound": "compute" if flops / peak_flops >= c.bytes_accessed / bandwidth else "memory",
      "collectives": c.collectives,
      "predicted_step_s": _significant(step_s),
      "xla_predicted_step_s": None if c.xla_seconds is None else _significant(c.xla_seconds),
      "predicted_images_per_s_per_chip": round(c.global_batch / step_s / target.chips, 2),
      "predicted_mfu": round(model_flops * images / step_s / peak_flops, 4),
  })
  return out


def _significant(value: float, digits: int = 4) -> float:
  return float(f"{value:.{digits}g}")


def rehearse(config, topology: str, *, search=STEPS, steps=STEPS, batch_limit: int = 1024,
             report=None, known: dict | None = None) -> dict:
  """Compile `config`'s steps for `topology`; the JSON-ready result (see the module docstring).

  steps: which of "train" and "eval" to compile. search: the steps whose largest batch that fits is
  also found (more compiles); a batch that does not fit is always searched, so that the answer names
  one that does; True and False mean all or none. batch_limit: the search's ceiling (global).
  known: {step: Compiled} of an earlier rehearsal of the same config at its batch, not compiled again.
  """
  from deeplab_jax import config as config_lib, sharding
  from deeplab_jax.models import resolve_depthwise_impl
  search = STEPS if search is True else () if search is False else tuple(search)
  config_lib.validate_training(config)
  target = accelerators.parse(topology)
  mesh = sharding.create_mesh(accelerators.devices(target))
  for step in steps:
    sharding.check_batch(int(_batch_field(config, step).batch_size), mesh, f"config.{step}.batch_size")
  result = {"topology": target.topology, "name": target.name, "chips": target.chips,
            "hosts": target.hosts, "chip": target.chip.name, "device_kind": target.chip.device_kind,
            "dtype": str(config.model.dtype),
            "depthwise_impl": resolve_depthwise_impl(config.model.depthwise_impl, target.chip.platform,
                                                     target.devices),
            "remat": bool(config.model.remat),
            "peak_flops_per_chip": target.chip.peak_flops,
            "hbm_bandwidth_per_chip": target.chip.hbm_bandwidth}
  for step in steps:
    batch = int(_batch_field(config, step).batch_size)
    first = (known or {}).get(step)
    if first is None or first.global_batch != batch:
      first = compile_step(config, mesh, step, batch)
      if report:
        report(first)
    best, at_best = None, None
    if step in search or not first.fits:
      limit = max(batch_limit // mesh.size, batch // mesh.size)
      usable = target.chip.usable_hbm_bytes / target.chip.devices_per_chip / accelerators.GIB
      best, at_best = max_global_batch(config, mesh, step, [first], limit, usable, report)
    model_flops = model_flops_per_image(config, mesh, step)
    summary_ = summary(first, target, best, model_flops)
    if at_best is not None and at_best is not first:
      at = summary(at_best, target, best, model_flops)
      summary_["at_max_global_batch"] = {k: at[k] for k in (
          "global_batch", "peak_memory_per_chip_gib", "bytes_per_image", "flop_per_byte",
          "predicted_step_s", "predicted_images_per_s_per_chip", "predicted_mfu")}
    if step == "train":
      result.update(summary_)
    else:
      result["eval"] = summary_
  return result


def format_table(result: dict) -> str:
  rows = [("step", "batch", "fits", "GiB/chip", "max batch", "GFLOP/img", "GB/img", "FLOP/B",
           "step s", "img/s/chip", "MFU", "compile s")]
  for step, r in (("train", result), ("eval", result.get("eval"))):
    if r is None:
      continue
    fits = r["fits"]
    rows.append((step, str(r["global_batch"]), "yes" if fits else "NO",
                 f"{r['peak_memory_per_chip_gib']}/{r['usable_hbm_per_chip_gib']}"
                 if r.get("peak_memory_per_chip_gib") is not None else f"?/{r['usable_hbm_per_chip_gib']}",
                 "-" if r["max_global_batch"] is None else str(r["max_global_batch"]),
                 f"{r['flops_per_image'] / 1e9:.0f}" if fits else "-",
                 f"{r['bytes_per_image'] / 1e9:.1f}" if fits else "-",
                 f"{r['flop_per_byte']}" if fits else "-",
                 f"{r['predicted_step_s']:.3g}" if fits else "-",
                 f"{r['predicted_images_per_s_per_chip']:.1f}" if fits else "-",
                 f"{100 * r['predicted_mfu']:.1f}%" if fits else "-", f"{r['compile_s']:.0f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
  head = (f"{result['name']}: {result['chips']} chips of {result['device_kind']} on {result['hosts']} "
          f"host{'s' if result['hosts'] > 1 else ''}, {result['dtype']}, depthwise "
          f"{result['depthwise_impl']}, remat {'on' if result['remat'] else 'off'}")
  for step, r in (("train", result), ("eval", result.get("eval"))):
    best = (r or {}).get("at_max_global_batch")
    if best:
      lines.append(f"{step} at the largest batch, {best['global_batch']}: {best['peak_memory_per_chip_gib']} "
                   f"GiB/chip, {best['flop_per_byte']} FLOP/B, {best['predicted_step_s']:.3g} s, "
                   f"{best['predicted_images_per_s_per_chip']:.1f} img/s/chip, MFU "
                   f"{100 * best['predicted_mfu']:.1f}%")
  return "\n".join([head] + lines)


def misfit_line(result: dict) -> str | None:
  """The error line for a config whose train or eval batch does not fit, or None."""
  for step, r in (("train", result), ("eval", result.get("eval"))):
    if r is None or r["fits"]:
      continue
    best = r["max_global_batch"]
    needed = r.get("peak_memory_per_chip_gib")
    what = (f"config.{step}.batch_size={r['global_batch']} does not fit {result['name']}"
            f"{f' (it needs {needed} GiB per chip' if needed else ' ('}"
            f"{', ' if needed else ''}{r['usable_hbm_per_chip_gib']} GiB are usable)")
    if best:
      return f"{what}; the largest global batch that fits is {best}: --config.{step}.batch_size={best}"
    if best == 0:
      return (f"{what}; not even one example per device fits: lower config.input.crop_size, set "
              f"config.model.dtype=bfloat16 or config.model.remat=True, or use a larger slice")
  return None


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "The config to rehearse.", lock_config=True)
  flags.DEFINE_string("topology", None, f"The slice: {accelerators.EXAMPLES}.")
  flags.DEFINE_bool("search", True, "Find the largest global batch that fits (more compiles); "
                    "without it only a misfit is searched.")
  flags.DEFINE_bool("eval", True, "Also compile the eval step.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  FLAGS = flags.FLAGS

  def progress(c: Compiled):
    logging.info("compiled %s at global batch %d in %.0f s: %s", c.step, c.global_batch, c.compile_s,
                 "fits" if c.fits else f"does not fit ({c.needed_gib} GiB per device asked)")

  def run():
    result = rehearse(FLAGS.config, FLAGS.topology, search=FLAGS.search,
                      steps=STEPS if FLAGS.eval else ("train",), report=progress)
    print(format_table(result))
    print(json.dumps(result), flush=True)
    line = misfit_line(result)
    if line:
      raise DoesNotFitError(line)

  # No persistent compilation cache: libtpu's compile-only client writes entries it cannot read back
  # ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable").
  runtime.run_command(run, compile_cache=False)


if __name__ == "__main__":
  _define_flags()
  runtime.run_app(main)
