"""DeepLabv3+ Xception-65 on PASCAL VOC 2012 (SPEC sections 2, 5-8): separable ASPP and decoder, OS16.

  python -m deeplab_jax.main --config=configs/voc_xception.py --workdir=gs://BUCKET/voc_xception

Meant for accelerators: the paper's global batch 16 at a 513 crop. Rehearsed on a CPU for a TPU v5e-4
(`python -m deeplab_jax.aot --config=configs/voc_xception.py --topology=v5litepod-4`; other slices
and the largest batches in benchmarks/README.md, TPU table): it fits with 7.1 of 15.75 GiB per chip
in float32, 4.1 with `--config.model.dtype=bfloat16` (which fits up to global batch 100), and the
roofline bounds it at 34 (float32) and 55 (bfloat16) images/s per chip (bfloat16 on a v4-8: 80, on a
v5p-8: 202). 30,000 steps on train_aug, SGD momentum 0.9, poly lr 0.007, weight decay 4e-5,
evaluation on val at OS16; `--config.eval.output_stride=8` evaluates the same weights at OS8.
Prepare the data first (`python -m deeplab_jax.datasets.prepare voc2012_segmentation
--manual_dir=DIR --data_dir=DATA`, docs/data.md). The paper's 79.8% starts from ImageNet weights:
convert the official checkpoint (xception_65_imagenet_2018_05_09.tar.gz, extracted; or timm's
xception65, docs/weights.md) and pass the folder:

  python -m deeplab_jax.weights convert --from=tf_deeplab --input=xception_65/model.ckpt \
      --output=gs://BUCKET/xception_65_imagenet
  python -m deeplab_jax.main --config=configs/voc_xception.py --workdir=gs://BUCKET/voc_xception \
      --config.init_from.path=gs://BUCKET/xception_65_imagenet
"""
from deeplab_jax import config as config_lib


def get_config():
  config = config_lib.default_config()  # The defaults are this recipe.
  config.model.backbone = "xception_65"
  config.model.output_stride = 16
  config.model.aspp_separable = True
  config.model.decoder_separable = True
  config.dataset.name = "voc2012_segmentation"
  config.dataset.train_split = "train_aug"
  config.dataset.eval_split = "val"
  config.dataset.num_classes = 21
  config.input.crop_size = (513, 513)
  config.train.steps = 30_000
  config.train.batch_size = 16
  config.optim.base_lr = 0.007
  config.optim.weight_decay = 4e-5
  config.eval.crop_size = (513, 513)
  return config
