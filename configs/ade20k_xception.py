"""DeepLabv3+ Xception-65 on ADE20K (SPEC sections 8-10): 150 classes, 150,000 steps, 513 crops, OS16.

  python -m deeplab_jax.main --config=configs/ade20k_xception.py --workdir=gs://BUCKET/ade20k_xception

Meant for accelerators: global batch 16 at 513x513. Rehearsed on a CPU for a TPU v5e-4 (`python -m
deeplab_jax.aot --config=configs/ade20k_xception.py --topology=v5litepod-4 --config.model.dtype=bfloat16`;
other slices in benchmarks/README.md, TPU table): it fits with 6.0 of 15.75 GiB per chip in bfloat16,
and the roofline bounds it at 52 images/s per chip. Label 0 ("other") is ignored.
Paper: 45.65% val with multi-scale evaluation. Prepare the data first:
`python -m deeplab_jax.datasets.prepare ade20k --manual_dir=DIR --data_dir=DATA` (docs/data.md).
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.dataset.name = "ade20k"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.num_classes = 150
  config.train.steps = 150_000
  # The official ADE20K input: longer side to 513, sides 16k + 1, so every image fits the 513 crop.
  config.input.min_resize_value = 513
  config.input.max_resize_value = 513
  config.input.resize_factor = 16
  return config
