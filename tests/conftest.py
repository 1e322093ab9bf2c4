"""Shared test helpers: cheap random variables for big models (real init compiles for ~20 s)."""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_variables(model, input_shape, seed: int = 0):
  """Variables shaped like `model.init`'s: He-scaled kernels, unit BN, so activations stay sane."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = math.prod(leaf.shape[:-1])
      return jnp.asarray(rng.normal(0, math.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
    if "scale" in name or "'var'" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture
def repo_root():
  return REPO


def run_module(args, timeout=300, env=None):
  """Run `python -m ...` from the repo root; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=full_env)


def load_config(path):
  """`get_config()` of a config file (configs/ is not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The shapes config shrunk for tests: 'tiny' data (48 train / 12 val), 33 px crops, batch 2. One table
# serves both the in-process config and the command-line flags of subprocess runs.
TINY_OVERRIDES = {
    "dataset.name": "synthetic_shapes/tiny",
    "input.crop_size": (33, 33),
    "optim.warmup_steps": 0,
    "train.batch_size": 2,
    "train.log_every_steps": 2,
    "eval.batch_size": 8,
    "checkpoint.keep": 2,
}
TINY_FLAGS = [f"--config.{key}={value}" for key, value in TINY_OVERRIDES.items()]


def tiny_config(data_dir, steps: int = 6):
  """`TINY_OVERRIDES` on the shapes config, plus a data dir and short step counts."""
  config = load_config(os.path.join(REPO, "configs", "shapes.py"))
  for key, value in TINY_OVERRIDES.items():
    group, field = key.split(".")
    setattr(config[group], field, value)
  config.dataset.data_dir = str(data_dir)
  config.train.steps = steps
  config.eval.every_steps = 4
  config.checkpoint.every_steps = 3
  return config


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data dir holding synthetic_shapes/tiny, built once per session."""
  from deeplab_jax import input_pipeline
  data_dir = tmp_path_factory.mktemp("tfds")
  input_pipeline.load_builder(tiny_config(data_dir))
  return data_dir


@pytest.fixture(scope="session")
def voc_data_dir(tmp_path_factory):
  """A TFDS data dir holding voc2012_segmentation built from fake archives (fake_data.VOC_SPLITS)."""
  import fake_data
  from deeplab_jax import datasets
  root = tmp_path_factory.mktemp("voc")
  fake_data.make_voc(root / "manual", **fake_data.VOC_SPLITS)
  sizes = datasets.prepare("voc2012_segmentation", str(root / "manual"), str(root / "tfds"))
  return root / "tfds", sizes


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory):
  """Environment for subprocess runs that share one persistent compilation cache (faster reruns)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache"))}
