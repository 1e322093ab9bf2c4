"""DeepLabv3+ Xception-65 on PASCAL VOC 2012 (SPEC sections 2, 5-8): separable ASPP and decoder, OS16.

  python -m deeplab_jax.main --config=configs/voc_xception.py --workdir=/tmp/voc_xception

Meant for accelerators (the paper's batch 16 at a 513 crop: a TPU v3-8 or 8 GPUs). Evaluate at OS8 with
`--config.model.output_stride=8` on the same checkpoint.
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()  # The defaults are this recipe's model.
  config.model.backbone = "xception_65"
  config.model.output_stride = 16
  config.model.aspp_separable = True
  config.model.decoder_separable = True
  config.dataset.name = "voc2012_segmentation"
  config.dataset.num_classes = 21
  return config
