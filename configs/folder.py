"""Your own images: a folder prepared by `datasets.prepare folder_segmentation`, nothing else to set.

  python -m deeplab_jax.datasets.prepare folder_segmentation --manual_dir=MY_FOLDER --data_dir=DATA \
      --num_classes=3
  python -m deeplab_jax.main --config=configs/folder.py --config.dataset.data_dir=DATA --workdir=W

The class count, ignore label, class names and splits ("train", and "val", "validation" or "test")
come from what `prepare` stored with the data; a value given on the command line that contradicts
the data stops in one line before training. What users change first:
  --config.model.backbone=xception_65 (or resnet_101_beta) for accuracy over speed, with
  --config.init_from.path=CONVERTED (ImageNet weights, docs/weights.md) and a smaller
  --config.optim.base_lr=0.007 (the paper's fine-tuning rate) instead of this from-scratch one;
  --config.train.steps (4,000 here: minutes on a CPU for a few hundred small images);
  --config.input.crop_size, the training crop ((257, 257) here; the paper's 513 for large photos);
  --config.eval.crop_size, where whole validation images are padded to; larger ones are evaluated
  through a sliding window of this size (config.eval.window_overlap: a third).
From scratch, the embedded default's recipe (configs/shapes.py): MobileNetV2 at width 0.5, SGD at 0.1
after a 100-step warm-up, batch 8.
"""
import importlib.util
import os

from ml_collections import config_dict


def _sibling(name: str):
  """configs/ is not a package: the shapes config by its path."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  config = _sibling("shapes").get_config()
  config.dataset.name = "folder_segmentation"
  # From the prepared data (input_pipeline.resolve_from_data); typed, so a command line may set them.
  config.dataset.num_classes = config_dict.placeholder(int)
  config.dataset.ignore_label = config_dict.placeholder(int)
  config.dataset.train_split = config_dict.placeholder(str)
  config.dataset.eval_split = config_dict.placeholder(str)
  config.input.cache = False  # own data may be large; shapes caches its 2,000 small images
  config.input.crop_size = (257, 257)
  config.eval.crop_size = (513, 513)
  return config
