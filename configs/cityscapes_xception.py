"""DeepLabv3+ Xception-65 on Cityscapes (SPEC section 8): 769x769 crops, 90,000 steps, OS16.

  python -m deeplab_jax.main --config=configs/cityscapes_xception.py --workdir=gs://BUCKET/cs_xception

Meant for accelerators: global batch 16 at 769x769. Rehearsed on a CPU for a TPU v5e-4 (`python -m
deeplab_jax.aot --config=configs/cityscapes_xception.py --topology=v5litepod-4
--config.model.dtype=bfloat16`; other slices in benchmarks/README.md, TPU table): it fits with 8.1 of
15.75 GiB per chip in bfloat16, and the roofline bounds it at 30 images/s per chip. Where the batch
does not fit, lower it and set `--config.model.freeze_bn=True`, as the official code does. Evaluates
whole 1024x2048 val images padded to 1025x2049 (the eval step at batch 8 fits the v5e-4 too).
Paper: 78.79% val (X-65). Prepare the data first: `python -m deeplab_jax.datasets.prepare cityscapes
--manual_dir=DIR --data_dir=DATA` (docs/data.md).
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.dataset.name = "cityscapes/semantic_segmentation"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.num_classes = 19  # train ids; the other label ids become 255
  config.input.crop_size = (769, 769)
  config.train.steps = 90_000
  config.eval.crop_size = (1025, 2049)
  config.eval.batch_size = 8
  return config
