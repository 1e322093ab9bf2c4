"""Train and evaluate DeepLab.

  python -m deeplab_jax.main --config=configs/shapes.py --workdir=/tmp/deeplab_shapes

Only flags live here; the work is in `train.train_and_evaluate(config, workdir)`.
"""
from __future__ import annotations

from deeplab_jax import allocator

if __name__ == "__main__":  # first, before jax and TensorFlow load: see allocator.py
  allocator.reexec_with_fast_allocator()

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from deeplab_jax import config as config_lib, console, distributed, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and summaries (local or gs://).")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()  # SLURM and Cloud TPU VMs are detected; elsewhere these three, everywhere


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def run():
    console.setup(FLAGS.verbosity)  # details to the workdir's log file; --verbosity=1 shows them live
    config_lib.validate_training(FLAGS.config)  # a bad value fails in a second, before TensorFlow loads
    from deeplab_jax import train
    distributed.initialize_from_flags()
    logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)

  runtime.run_command(run)


if __name__ == "__main__":
  runtime.run_app(main)
