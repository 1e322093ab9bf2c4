"""JAX against PyTorch on the same DeepLabv3+, same size and batch, in one run.

  pip install torch==2.13.0   # CPU build; optional, only this script needs it
  python benchmarks/compare_torch.py --config=configs/voc_xception.py --size=257 --batch=2

Times the JAX train step and inference forward with the config's depthwise formulation (default
"auto") and with the reference ("grouped"), and PyTorch's (benchmarks/torch_deeplab.py, a separate
process with glibc's allocator unless --torch_allocator=fast), alternating in many short rounds:
this machine's speed drifted by 10-20% within minutes, so long blocks let the drift pick the winner.
Prints each round's ratios and the running medians, then one JSON line with the ratios of the
medians JAX/PyTorch (below 1: JAX is faster), the compile time of the JAX train step and its page
faults per step.
"""
from deeplab_jax import allocator

if __name__ == "__main__":
  allocator.reexec_with_fast_allocator()

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

from deeplab_jax import config as config_lib  # noqa: E402
from deeplab_jax.models import xception  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(HERE, "..", "configs", "voc_xception.py"),
                                "Config file.", lock_config=True)
flags.DEFINE_integer("size", 257, "Square input size.")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_integer("rounds", 8, "Alternating rounds.")
flags.DEFINE_integer("steps", 3, "Timed steps per variant and round (the reference: 1).")
flags.DEFINE_bool("reference", True, "Also time the reference grouped formulation.")
flags.DEFINE_enum("torch_allocator", "system", ["system", "fast"],
                  "PyTorch's allocator: glibc's, or the one the JAX side gets (allocator.py).")
FLAGS = flags.FLAGS


def model_flags(config) -> list[str]:
  """The torch_worker flags that build `config`'s network; torch_deeplab has Xception backbones only."""
  m = config.model
  if (m.backbone not in xception.VARIANTS or not m.use_decoder or m.depth_multiplier != 1.0 or
      tuple(m.multi_grid) != (1, 1, 1)):
    raise app.UsageError(f"the PyTorch twin builds DeepLabv3+ on {', '.join(xception.VARIANTS)} at "
                         f"depth multiplier 1 without multi-grid; config.model is {m.backbone}, "
                         f"use_decoder={m.use_decoder}, depth_multiplier={m.depth_multiplier}, "
                         f"multi_grid={tuple(m.multi_grid)}")
  rates = config_lib.atrous_rates(m)
  return [f"--num_classes={int(config.dataset.num_classes)}", f"--backbone={m.backbone}",
          f"--output_stride={int(m.output_stride)}", f"--atrous_rates={','.join(map(str, rates))}",
          f"--aspp_separable={int(m.aspp_separable)}", f"--decoder_separable={int(m.decoder_separable)}"]


class TorchWorker:
  def __init__(self, size: int, batch: int, config, fast_allocator: bool):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "_DEEPLAB_JAX_REEXEC", *allocator.SETTINGS)}
    if fast_allocator and allocator.find():
      env |= allocator.SETTINGS | {"LD_PRELOAD": allocator.find()}
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "torch_worker.py"), f"--size={size}", f"--batch={batch}",
         *model_flags(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = json.loads(self.process.stdout.readline())

  def run(self, mode: str, steps: int) -> list[float]:
    self.process.stdin.write(f"{mode} {steps}\n")
    self.process.stdin.flush()
    return json.loads(self.process.stdout.readline())

  def close(self):
    self.process.stdin.close()
    self.process.wait()


def main(argv):
  del argv
  config = FLAGS.config
  variants = {"jax": config}
  if FLAGS.reference:
    reference = config.copy_and_resolve_references()
    with reference.unlocked():
      reference.model.depthwise_impl = "grouped"
    variants["jax_reference"] = reference
  steps = {(name, mode): harness.build(cfg, FLAGS.size, FLAGS.batch, mode)
           for name, cfg in variants.items() for mode in ("train", "infer")}
  worker = TorchWorker(FLAGS.size, FLAGS.batch, config, FLAGS.torch_allocator == "fast")
  print(f"torch {worker.info}", flush=True)
  times = {key: [] for key in list(steps) + [("torch", "train"), ("torch", "infer")]}
  for step in steps.values():  # warm-up
    step.run()
  worker.run("train", 2)
  worker.run("infer", 2)
  for round_ in range(FLAGS.rounds):
    ratios = []
    for mode in ("train", "infer"):
      for name in variants:
        count = FLAGS.steps if name == "jax" else 1
        times[name, mode] += [steps[name, mode].run() for _ in range(count)]
      times["torch", mode] += worker.run(mode, FLAGS.steps)
      this_round = lambda name: statistics.median(times[name, mode][-FLAGS.steps:])  # noqa: E731
      ratios.append(f"{mode} {this_round('jax') / this_round('torch'):.3f}")
    print(f"round {round_ + 1}: ratios {', '.join(ratios)}; medians so far " +
          ", ".join(f"{n}/{m} {statistics.median(t):.3f}s" for (n, m), t in times.items()), flush=True)
  worker.close()
  median = {key: statistics.median(t) for key, t in times.items()}
  result = {"size": FLAGS.size, "batch": FLAGS.batch,
            "depthwise_impl": harness.depthwise_impl(config), "jax_allocator": allocator.loaded(),
            "torch_allocator": worker.info["allocator"], "torch_threads": worker.info["threads"],
            "compile_s_train": round(steps["jax", "train"].compile_s, 2),
            # After the warm-up run: the allocator's effect (glibc's malloc: ~337k a step).
            "jax_train_page_faults_per_step": round(statistics.median(
                steps["jax", "train"].fault_counts[1:]))}
  for name in variants:
    for mode in ("train", "infer"):
      result[f"{name}_{mode}_s"] = round(median[name, mode], 4)
      result[f"{name}_{mode}_ratio"] = round(median[name, mode] / median["torch", mode], 3)
  for mode in ("train", "infer"):
    result[f"torch_{mode}_s"] = round(median["torch", mode], 4)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
