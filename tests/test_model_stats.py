"""SPEC section 7: parameter counts exactly, the six Xception-65 GMACs rows within 0.3%."""
import json

import pytest

from conftest import run_module
from deeplab_jax import config as config_lib
from deeplab_jax.models.complexity import model_stats


def xception_config(output_stride=16, decoder=True, separable=True):
  config = config_lib.default_config()
  config.model.output_stride = output_stride
  config.model.use_decoder = decoder
  config.model.aspp_separable = separable
  config.model.decoder_separable = separable
  return config


def test_parameter_counts_match_spec():
  stats = model_stats(xception_config(), 513)
  assert stats["params"] == 41_055_413
  assert stats["parts"]["backbone"]["params"] == 37_867_312
  assert model_stats(xception_config(separable=False), 513)["params"] == 54_711_461


@pytest.mark.parametrize("output_stride,decoder,separable,gmacs", [
    (16, False, False, 64.92), (8, False, False, 227.04), (16, True, False, 86.68),
    (8, True, False, 248.78), (16, True, True, 54.04), (8, True, True, 176.85)])
def test_gmacs_match_spec(output_stride, decoder, separable, gmacs):
  stats = model_stats(xception_config(output_stride, decoder, separable), 513)
  assert abs(stats["gmacs"] / gmacs - 1) < 0.003, stats["gmacs"]
  assert abs(sum(p["gmacs"] for p in stats["parts"].values()) - stats["gmacs"]) < 1e-9
  assert ("decoder" in stats["parts"]) == decoder


def test_cli_prints_table_and_json_with_overrides():
  result = run_module(["deeplab_jax.model_stats", "--config=configs/voc_xception.py", "--size=513",
                       "--config.model.output_stride=8"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert any(line.startswith("backbone") for line in lines)
  last = json.loads(lines[-1])
  assert last["params"] == 41_055_413 and abs(last["gmacs"] / 176.85 - 1) < 0.003
  assert last["batch_stats"] > 0


def test_cli_rejects_a_bad_config_value_in_one_line():
  result = run_module(["deeplab_jax.model_stats", "--config=configs/voc_xception.py",
                       "--config.model.output_stride=12"])
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "deeplab_jax: error: config.model.output_stride=12 is not supported; use 8, 16 or 32")
