"""Every config loads, validates and builds its model; bad values fail with one clear line."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, load_config, run_module
from deeplab_jax import config as config_lib
from deeplab_jax.models import create_model

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_the_configs_the_issues_name_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"voc_xception.py", "voc_resnet101.py", "cityscapes_xception.py", "ade20k_xception.py",
          "shapes.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_its_model(path):
  config = load_config(path)
  config_lib.validate_training(config)
  assert "python -m deeplab_jax.main --config=configs/" in open(path).read()  # docstring command
  if config.dataset.num_classes is None:  # folder.py: the data's count, filled in when it loads
    config.dataset.num_classes = 3
  model = create_model(config)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  assert variables["params"]["logits"]["semantic"]["bias"].shape == (config.dataset.num_classes,)


def test_voc_configs_follow_the_spec():
  x = load_config(os.path.join(REPO, "configs", "voc_xception.py"))
  assert (x.model.backbone, x.model.output_stride, x.model.aspp_separable, x.model.decoder_separable,
          x.dataset.num_classes) == ("xception_65", 16, True, True, 21)
  assert (x.input.crop_size, x.train.batch_size, x.train.steps, x.optim.base_lr, x.optim.lr_power,
          x.optim.momentum, x.optim.weight_decay, x.optim.warmup_steps) == (
              (513, 513), 16, 30_000, 0.007, 0.9, 0.9, 4e-5, 0)
  assert (x.input.min_scale, x.input.max_scale, x.input.scale_step, x.input.flip) == (0.5, 2.0, 0.25, True)
  assert (x.dataset.train_split, x.dataset.ignore_label, x.eval.crop_size) == ("train_aug", 255, (513, 513))
  c = load_config(os.path.join(REPO, "configs", "cityscapes_xception.py"))
  assert (c.input.crop_size, c.train.steps, c.dataset.num_classes) == ((769, 769), 90_000, 19)
  a = load_config(os.path.join(REPO, "configs", "ade20k_xception.py"))
  assert (a.train.steps, a.dataset.num_classes) == (150_000, 150)
  r = load_config(os.path.join(REPO, "configs", "voc_resnet101.py"))
  assert (r.model.backbone, tuple(r.model.multi_grid), r.model.aspp_separable,
          r.model.decoder_separable, r.optim.weight_decay) == ("resnet_101_beta", (1, 2, 4), False, False,
                                                               1e-4)


def test_atrous_rates_derive_from_and_scale_with_output_stride():
  m = config_lib.default_config().model
  assert [config_lib.atrous_rates(m, os) for os in (8, 16, 32)] == [(12, 24, 36), (6, 12, 18), (3, 6, 9)]
  m.atrous_rates = (4, 8, 12)  # explicit rates are at the config's own output stride (16)
  assert config_lib.atrous_rates(m) == (4, 8, 12) and config_lib.atrous_rates(m, 8) == (8, 16, 24)
  assert config_lib.atrous_rates(m, 32) == (2, 4, 6)
  m.atrous_rates = ()
  assert config_lib.atrous_rates(m) == ()
  m.atrous_rates = (5,)
  with pytest.raises(config_lib.ConfigError, match="whole rates"):
    config_lib.atrous_rates(m, 32)


@pytest.mark.parametrize("field,value,message", [
    ("backbone", "vgg16", "config.model.backbone='vgg16' is not a backbone"),
    ("output_stride", 4, "config.model.output_stride=4 is not supported"),
    ("multi_grid", (1, 2), "config.model.multi_grid=(1, 2) must be 3 positive rates"),
    ("dtype", "float16", "config.model.dtype='float16' is not supported"),
    ("depth_multiplier", 0.0, "config.model.depth_multiplier=0.0 must be > 0"),
])
def test_bad_values_raise_config_error(field, value, message):
  config = config_lib.default_config()
  setattr(config.model, field, value)
  with pytest.raises(config_lib.ConfigError) as e:
    create_model(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("path,value,message", [
    ("input.crop_size", (513,), "config.input.crop_size=(513,) must be (height, width)"),
    ("train.steps", 0, "config.train.steps=0 must be a positive integer"),
    ("optim.warmup_steps", 30_000, "config.optim.warmup_steps=30000 must be in [0, config.train.steps"),
    ("loss.top_k_percent", 0.0, "config.loss.top_k_percent=0.0 must be in (0, 100]"),
    ("loss.class_weights", (1.0, 2.0), "config.loss.class_weights has 2 entries but"),
    ("eval.output_stride", 4, "config.eval.output_stride=4 is not supported"),
    ("input.min_scale", 3.0, "config.input scales min=3.0, max=2.0"),
    ("mesh.param_sharding", "zero", "config.mesh.param_sharding='zero': choose one of"),
    ("dataset.ignore_label", 7, "config.dataset.ignore_label=7 must be in [num_classes, 255]"),
    ("model.depthwise_impl", "fft", "config.model.depthwise_impl='fft': choose one of"),
    ("model.bn_momentum", 1.5, "config.model.bn_momentum=1.5 must be in [0, 1)"),
    ("optim.optimizer", "adamw", "config.optim.optimizer='adamw': choose one of sgd, adam"),
])
def test_bad_training_values_raise_config_error(path, value, message):
  config = config_lib.default_config()
  group, field = path.split(".")
  setattr(config[group], field, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_training(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_main_rejects_a_bad_value_with_one_line_and_nonzero_exit(tmp_path):
  result = run_module(["deeplab_jax.main", "--config=configs/shapes.py", f"--workdir={tmp_path}",
                       "--config.model.backbone=vgg16"])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "deeplab_jax: error: config.model.backbone='vgg16' is not a backbone; choose one of")
