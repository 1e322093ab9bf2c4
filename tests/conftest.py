"""Shared test helpers: cheap random variables for big models (real init compiles for ~20 s)."""
from __future__ import annotations

import fcntl
import json
import math
import os
import pathlib
import shutil
import sys
import textwrap
import types

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


def assert_close_at_scale(got, want, rtol: float, what: str = "", scale: float | None = None):
  """max |got - want| <= rtol * scale, the scale being max |want| unless given: two float32 programs
  that sum in another order (another formulation, remat, another host's vector width: AVX2 against
  AVX-512) differ by rounding relative to the quantity's scale, not to each entry; entries near zero
  carry no relative precision at all."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  if not want.size:
    return
  scale = float(np.max(np.abs(want))) if scale is None else scale
  error = float(np.max(np.abs(got - want)))
  assert error <= rtol * scale + np.finfo(np.float32).tiny, (
      f"{what}: max |difference| {error:.3g} > {rtol:g} x scale {scale:.3g}")


def assert_trees_close_at_scale(got, want, rtol: float):
  """`assert_close_at_scale` leaf by leaf, at the scale of the whole tree (its largest entry): a leaf
  whose true value is zero (the gradient of a BN bias that a later train-mode BN cancels) holds
  only rounding noise from sums of much larger terms, so its own largest entry is no scale at all."""
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves(want)
  assert len(got_leaves) == len(want_leaves)
  scale = max((float(np.max(np.abs(np.asarray(b)))) for b in want_leaves if np.size(b)), default=0.0)
  for (path, a), b in zip(got_leaves, want_leaves):
    assert_close_at_scale(a, b, rtol, jax.tree_util.keystr(path), scale=scale)


@pytest.fixture
def repo_root():
  return REPO


def run_module(args, timeout=300, env=None):
  """Run `python -m ...` from the repo root; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=full_env)


def saved_state(workdir, step):
  """(params, batch_stats) of a workdir's checkpoint at `step`, as NumPy trees."""
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                             "default"))
  return restored["params"], restored["batch_stats"]


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
    # Sizes and frequencies only: the model's path (depthwise_impl "auto", remat, dtype) stays the
    # config's default, so the tests run what users run.
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


def initialized_evaluation(config) -> dict:
  """Training's evaluation (train.Evaluator) of a freshly initialized model of `config` on all
  devices of all processes: the same numbers on one process or several."""
  from deeplab_jax import input_pipeline, sharding, train
  mesh = sharding.create_mesh()
  model = train.model_for_mesh(config, mesh)
  _, shardings, init = train.sharded_init(config, model, train.create_tx(config), mesh,
                                          jax.random.key(int(config.seed)))
  evaluator = train.Evaluator(config, input_pipeline.load_builder(config), mesh, shardings)
  return evaluator(init(jax.random.key(int(config.seed))))[0]


def built_once(tmp_path_factory, name, build):
  """What `build(folder)` returns (JSON), built by the first pytest-xdist worker that asks and read by
  the others: each worker would otherwise build its own copy of every session fixture (the 8-device
  step checks alone cost 80 s). The built folders are read-only to the tests: a test that writes
  into one copies it first."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above the workers' own
  folder, done = root / name, root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while one builds
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      done.write_text(json.dumps(build(folder)))
  return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data dir holding synthetic_shapes/tiny, built once per session."""
  from deeplab_jax import input_pipeline

  def build(folder):
    input_pipeline.load_builder(tiny_config(folder))
    return str(folder)
  return pathlib.Path(built_once(tmp_path_factory, "tfds", build))


TRAINED_STEPS = 30


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data_dir, compile_cache_env):
  """README command 1's code path, shrunk: the real main, 30 steps, evaluation every 10; the workdir
  (read-only: copy it to write) is what infer, evaluate and export are run on. The run's result has
  args, returncode, stdout and stderr."""
  def build(workdir):
    args = ["deeplab_jax.main", "--config=configs/shapes.py", f"--workdir={workdir}",
            f"--config.dataset.data_dir={tiny_data_dir}", f"--config.train.steps={TRAINED_STEPS}",
            *TINY_FLAGS, "--config.eval.every_steps=10", "--config.checkpoint.every_steps=5"]
    result = run_module(args, env=compile_cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"workdir": str(workdir), "args": args, "returncode": result.returncode,
            "stdout": result.stdout, "stderr": result.stderr}
  built = built_once(tmp_path_factory, "trained", build)
  return pathlib.Path(built.pop("workdir")), types.SimpleNamespace(**built)


@pytest.fixture
def trained_workdir(trained_run, tiny_data_dir):
  return trained_run[0], tiny_data_dir


@pytest.fixture(scope="session")
def voc_data_dir(tmp_path_factory):
  """A TFDS data dir holding voc2012_segmentation built from fake archives (fake_data.VOC_SPLITS)."""
  import fake_data
  from deeplab_jax import datasets

  def build(root):
    fake_data.make_voc(root / "manual", **fake_data.VOC_SPLITS)
    sizes = datasets.prepare("voc2012_segmentation", str(root / "manual"), str(root / "tfds"))
    return [str(root / "tfds"), sizes]
  data_dir, sizes = built_once(tmp_path_factory, "voc", build)
  return pathlib.Path(data_dir), sizes


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory):
  """Environment for subprocess runs that share one persistent compilation cache (faster reruns),
  shared by the xdist workers too."""
  return {"JAX_COMPILATION_CACHE_DIR": built_once(tmp_path_factory, "xla_cache", str)}


# One 8-device process checks the step two ways, reusing its compiled programs (the MobileNetV2 step
# compiles in ~15 s on one device, ~35 s on eight): sharded == unsharded, and a non-finite batch
# leaves the state as it was. It also saves its fsdp-sharded state as a checkpoint, which the
# inference tests restore on one device (a second 8-device process would cost ~20 s more).
STEP_CHECKS = textwrap.dedent("""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from deeplab_jax import checkpoints, sharding, train
    from etils import epath
    from deeplab_jax.models import create_model
    assert jax.device_count() == 8
    config = tiny_config(sys.argv[1])
    config.model.depth_multiplier = 0.25
    config.optim.base_lr = 0.007  # the SPEC recipe's rate: see test_eight_device_step_equals_one_device_step
    config.train.batch_size = 16
    model, tx = create_model(config), train.create_tx(config)
    init = functools.partial(train.init_state, model=model, tx=tx)
    state = jax.jit(init)(jax.random.key(0))  # the real init: 1e-5 holds at its scales
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(0, 255, (16, 33, 33, 3)).astype(np.float32),
             "label": rng.integers(0, 6, (16, 33, 33)).astype(np.uint8)}
    batch["label"][:, :4] = 255
    step = functools.partial(train.train_step, model=model, tx=tx,
                             schedule=train.learning_rate_schedule(config), loss_config=config.loss,
                             ignore_label=255, dropout_rng=jax.random.key(1))

    def compiled(devices, mode):
      mesh = sharding.create_mesh(devices)
      shard = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, mode, 1024)
      batch_shard = sharding.batch_sharding(mesh)
      fn = jax.jit(step, in_shardings=(shard, batch_shard), out_shardings=(shard, sharding.replicated(mesh)))
      return lambda s, b: fn(jax.device_put(s, shard), sharding.to_global(b, batch_shard))

    def max_diff(x, y):
      return max((float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))), default=0.0)

    facts = {}
    one, one_metrics = compiled(jax.devices()[:1], "replicated")(state, batch)
    sharded_steps = {}
    for mode in ("replicated", "fsdp"):
      sharded_steps[mode] = compiled(jax.devices(), mode)
      new, metrics = sharded_steps[mode](state, batch)
      facts[mode] = {
          "sharded_params": sum(any(leaf.sharding.spec) for leaf in jax.tree.leaves(new.params)),
          "params": max_diff(one.params, new.params),
          "batch_stats": max_diff(one.batch_stats, new.batch_stats),
          "loss": abs(float(one_metrics["loss"]) - float(metrics["loss"])),
      }
    # Non-finite input on the sharded step, then a good batch: the first changes nothing but the step.
    bad = dict(batch, image=np.full_like(batch["image"], np.nan))
    after_bad, bad_metrics = sharded_steps["fsdp"](state, bad)
    after_good, good_metrics = sharded_steps["fsdp"](after_bad, batch)
    facts["nonfinite"] = {
        "flag_bad": int(bad_metrics["nonfinite"]), "flag_good": int(good_metrics["nonfinite"]),
        "step": int(after_bad.step),
        "state_change": max_diff((state.params, state.batch_stats, state.opt_state),
                                 (after_bad.params, after_bad.batch_stats, after_bad.opt_state)),
        "good_step_change": max_diff(after_bad.params, after_good.params),
    }
    # The state after two fsdp steps, saved as a training run would: checkpoint 2 and config.json.
    workdir = epath.Path(sys.argv[2])
    manager = checkpoints.create_manager(workdir, keep=1, async_save=False)
    checkpoints.save(manager, int(after_good.step), after_good)
    manager.wait_until_finished()
    train._write_config(workdir, config)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
        {"params": after_good.params, "bn": after_good.batch_stats})}
    np.savez(workdir / "expected.npz", **flat)
    facts["saved"] = {"step": int(after_good.step), "sharded_params": sum(
        not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(after_good.params))}
    print("FACTS", json.dumps(facts))
""")


@pytest.fixture(scope="session")
def step_facts(tiny_data_dir, tmp_path_factory):
  """What STEP_CHECKS measured, plus "workdir": where it saved its 8-device checkpoint."""
  import subprocess

  def build(workdir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", STEP_CHECKS, str(tiny_data_dir), str(workdir)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("FACTS ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS "):]) | {"workdir": str(workdir)}
  facts = built_once(tmp_path_factory, "saved_on_8", build)
  return facts | {"workdir": pathlib.Path(facts["workdir"])}


# The longest tests (minutes of real processes), longest first: pytest-xdist hands tests out in
# collection order, so these start at once on both workers and the short ones fill in behind them,
# instead of one of them starting last and running alone at the end.
LONGEST_FIRST = (
    "test_distributed.py::test_two_processes_preempted_and_resumed",
    "test_reliability.py::test_kill_9_at_six_random_moments",
    "test_weights.py::test_convert_command_then_a_six_class_run",
    "test_infer.py::test_a_checkpoint_saved_on_8_devices_restores_on_1",
    "test_weights.py::test_voc_xception_fine_tunes_end_to_end",
    "test_reliability.py::test_each_bad_input_is_one_line",
    "test_aot.py::test_the_embedded_default_compiles_for_a_4_chip_v5e",
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = item.nodeid.split("/")[-1]
    return next((k for k, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix)),
                len(LONGEST_FIRST))
  items.sort(key=rank)


@pytest.fixture(scope="session")
def zoo_tarball(tmp_path_factory):
  """An official model-zoo tarball in the zoo's layout and names (one folder holding model.ckpt.index,
  model.ckpt.data-00000-of-00001 and frozen_inference_graph.pb): MobileNetV2 (0.5 wide, to stay small)
  DeepLabv3 with the zoo MobileNetV2's head (image pooling and 1x1 branches, no decoder), 21 classes.
  Returns (the .tar.gz, its extracted folder, the tensors by official name)."""
  import tarfile
  import fake_weights as fw
  root = tmp_path_factory.mktemp("zoo")
  backbone, low_level, features = fw.mobilenet_v2(0.5)
  shapes = {**backbone, **fw.deeplab_head(features, low_level, num_classes=21, rates=0, decoder=False)}
  values = fw.signal_values(shapes, seed=2)
  folder = root / "deeplabv3_mnv2_pascal_train_aug"
  folder.mkdir()
  fw.write_tf_checkpoint(folder / "model.ckpt", values)
  (folder / "frozen_inference_graph.pb").write_bytes(b"\0" * 64)  # not read: the checkpoint is
  tarball = root / "deeplabv3_mnv2_pascal_train_aug_2018_01_29.tar.gz"
  with tarfile.open(tarball, "w:gz") as archive:
    archive.add(folder, arcname=folder.name)
  return tarball, folder, values
