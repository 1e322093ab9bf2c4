"""Benchmark a config's train or inference step on whatever backend is present.

  python benchmarks/run.py --config=configs/voc_xception.py --size=257 --batch=2 --mode=train

Any `--config.*` override works (e.g. --config.model.depthwise_impl=grouped for the reference
formulation, --config.model.dtype=bfloat16). The last line is one JSON object: compile_s, step_s
(median of --steps after --warmup), images_per_s, peak_mem_gb, page_faults_per_step, gmacs,
gflops_per_s (achieved), matmul_gflops_per_s (this backend's dense matmul rate, measured in the same
run) and roofline_ratio (their quotient).
"""
from deeplab_jax import allocator

if __name__ == "__main__":
  allocator.reexec_with_fast_allocator()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("size", 257, "Square input size.")
flags.DEFINE_integer("batch", 2, "Global batch size.")
flags.DEFINE_enum("mode", "train", ["train", "infer"], "The train step or the inference forward.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  step = harness.build(FLAGS.config, FLAGS.size, FLAGS.batch, FLAGS.mode)
  print(json.dumps(harness.measure(step, FLAGS.steps, FLAGS.warmup)), flush=True)


if __name__ == "__main__":
  app.run(main)
