"""DeepLabv3+ Xception-65 on ADE20K (SPEC sections 8-10): 150 classes, 150,000 steps, 513 crops, OS16.

  python -m deeplab_jax.main --config=configs/ade20k_xception.py --workdir=gs://BUCKET/ade20k_xception

Meant for a TPU v3-8 / v4-8 or 8 GPUs (global batch 16 at 513x513). Label 0 ("other") is ignored.
Paper: 45.65% val with multi-scale evaluation. Needs the data prepared (issue #4), which also brings
the official resize of the longer side to 513 that lets every val image fit the 513 eval crop.
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.dataset.name = "ade20k"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.num_classes = 150
  config.train.steps = 150_000
  return config
