"""DeepLabv3+ ResNet-101 beta on PASCAL VOC 2012: regular ASPP and decoder convs, multi-grid (1, 2, 4), OS16.

  python -m deeplab_jax.main --config=configs/voc_resnet101.py --workdir=gs://BUCKET/voc_resnet101

Meant for accelerators: global batch 16 at a 513 crop. Rehearsed on a CPU for a TPU v5e-4 (`python -m
deeplab_jax.aot --config=configs/voc_resnet101.py --topology=v5litepod-4 --config.model.dtype=bfloat16`;
other slices in benchmarks/README.md, TPU table): it fits with 4.5 of 15.75 GiB per chip in bfloat16,
and the roofline bounds it at 48 images/s per chip. The paper's 78.85% VOC val
(decoder, OS16) is this model, fine-tuned from ImageNet weights. Weight decay 1e-4 for ResNet (SPEC 8).
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.model.backbone = "resnet_101_beta"
  config.model.multi_grid = (1, 2, 4)
  config.model.aspp_separable = False
  config.model.decoder_separable = False
  config.dataset.name = "voc2012_segmentation"
  config.dataset.num_classes = 21
  config.optim.weight_decay = 1e-4
  return config
