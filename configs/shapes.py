"""The embedded default: a small DeepLabv3+ on synthetic shapes, trained on a laptop CPU in minutes.

  python -m deeplab_jax.main --config=configs/shapes.py --workdir=/tmp/deeplab_shapes

Meant for a 2-core CPU: no download, the data set is generated locally. Same code path as VOC.
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.model.backbone = "mobilenet_v2"
  config.model.depth_multiplier = 0.5
  config.dataset.name = "shapes"
  config.dataset.num_classes = 6  # background + 5 shape classes
  return config
