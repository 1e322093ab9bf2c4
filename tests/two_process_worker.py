"""One of two JAX processes on localhost (2 CPU devices each) reading the input pipeline.

  python tests/two_process_worker.py PROCESS_ID PORT DATA_DIR OUT_JSON

Writes which images this process read in each training step, which images the global batch assembled
on the 4-device mesh held, and which (real) images its evaluation batches held; the test compares the
two processes' files. Images are told apart by their fill value (tests/fake_data.py).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_STEPS = 10  # two epochs: 20 train images, global batch 4


def image_numbers(images) -> list[int]:
  import fake_data
  values = np.median(images.reshape(len(images), -1), axis=1)
  return [next(k for k in range(fake_data.DISTINCT_IMAGES) if abs(fake_data.image_value(k) - v) <= 2)
          for v in values]


def main():
  process_id, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from jax.experimental import multihost_utils

  from conftest import initialized_evaluation, tiny_config
  from deeplab_jax import input_pipeline, sharding

  config = tiny_config(data_dir)
  config.dataset.name, config.dataset.num_classes = "folder_segmentation", 4
  config.input.crop_size = (10, 14)  # the images' size, no scaling or flip: pixels stay as stored
  config.input.min_scale = config.input.max_scale = 1.0
  config.input.flip = False
  config.train.batch_size, config.eval.batch_size = 4, 4
  config.eval.crop_size = (10, 14)
  builder = input_pipeline.load_builder(config)
  mesh = sharding.create_mesh()
  batch_sh = sharding.batch_sharding(mesh)
  result = {"process_count": jax.process_count(), "devices": len(mesh.devices.flat),
            "train_local": [], "train_global": [], "eval_local": []}
  batches = input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config))
  for _ in range(TRAIN_STEPS):
    local = next(batches)
    result["train_local"].append(image_numbers(local["image"]))
    global_batch = sharding.to_global(local, batch_sh)
    gathered = multihost_utils.process_allgather(global_batch["image"], tiled=True)
    result["train_global"].append(image_numbers(np.asarray(gathered)))
  for batch, windows in input_pipeline.eval_batches(builder, config):
    numbers = image_numbers(batch["image"][batch["mask"]]) if batch["mask"].any() else []
    numbers += [image_numbers(w.image[None])[0] for w in windows if w is not None and w.last]
    result["eval_local"].append(numbers)
  # Training's evaluation over both processes with a 17x17 eval crop: process 0's shard holds the two
  # larger images (24 sliding windows), process 1's none, so their batch counts differ (13 and 2).
  config.eval.crop_size = (17, 17)
  evaluation = initialized_evaluation(config)
  result["evaluation"] = np.asarray(evaluation["confusion_matrix"]).tolist()
  # Synchronized BatchNorm across processes: value and input gradient of a train-mode BN over the
  # step-0 global batch (the test recomputes both on one device).
  from deeplab_jax.models.batch_norm import batch_norm_train
  first = sharding.to_global(next(input_pipeline.as_numpy(
      input_pipeline.train_dataset(builder, config))), batch_sh)["image"]

  def bn_loss(x):
    y = batch_norm_train(x, jax.numpy.ones(3), jax.numpy.zeros(3), 1e-3)[0]
    return jax.numpy.sum(y * jax.numpy.linspace(-1.0, 1.0, y.size).reshape(y.shape))

  value, grad = jax.jit(jax.value_and_grad(bn_loss), out_shardings=(
      sharding.replicated(mesh), batch_sh))(first)
  result["bn"] = {"image": np.asarray(multihost_utils.process_allgather(first, tiled=True)).tolist(),
                  "value": float(value),
                  "grad": np.asarray(multihost_utils.process_allgather(grad, tiled=True)).tolist()}
  with open(out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
