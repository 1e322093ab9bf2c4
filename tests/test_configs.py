"""Every config loads, validates and builds its model; bad values fail with one clear line."""
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_module
from deeplab_jax import config as config_lib
from deeplab_jax.models import create_model

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_configs_the_issues_name_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"voc_xception.py", "voc_resnet101.py", "shapes.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_its_model(path):
  config = load(path)
  assert "python -m deeplab_jax.main --config=configs/" in open(path).read()  # docstring command
  model = create_model(config)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  assert variables["params"]["logits"]["semantic"]["bias"].shape == (config.dataset.num_classes,)


def test_voc_configs_follow_the_spec():
  x = load(os.path.join(REPO, "configs", "voc_xception.py"))
  assert (x.model.backbone, x.model.output_stride, x.model.aspp_separable, x.model.decoder_separable,
          x.dataset.num_classes) == ("xception_65", 16, True, True, 21)
  r = load(os.path.join(REPO, "configs", "voc_resnet101.py"))
  assert (r.model.backbone, tuple(r.model.multi_grid), r.model.aspp_separable,
          r.model.decoder_separable) == ("resnet_101_beta", (1, 2, 4), False, False)


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


def test_main_rejects_a_bad_value_with_one_line_and_nonzero_exit(tmp_path):
  result = run_module(["deeplab_jax.main", "--config=configs/shapes.py", f"--workdir={tmp_path}",
                       "--config.model.backbone=vgg16"])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "deeplab_jax: config.model.backbone='vgg16' is not a backbone; choose one of")
