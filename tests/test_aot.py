"""deeplab_jax.aot: the real train and eval steps compiled by libtpu for TPU slices, on this CPU."""
import json
import os
import sys

import pytest

from conftest import REPO, load_config, run_module
from deeplab_jax import accelerators, aot
from deeplab_jax.errors import ConfigError
from deeplab_jax.models import complexity, create_model, resolve_depthwise_impl

KEYS = {"topology", "chips", "hosts", "chip", "global_batch", "dtype", "compile_s", "fits",
        "hbm_per_chip_gib", "peak_memory_per_chip_gib", "max_global_batch", "flops_per_image",
        "bytes_per_image", "collectives", "predicted_step_s", "predicted_images_per_s_per_chip",
        "predicted_mfu"}


def _last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def test_the_embedded_default_compiles_for_a_4_chip_v5e_and_fits():
  """The command as users run it, on the shapes config's own values: the train step's FLOPs are the
  model's (3 forwards' worth), synchronized BatchNorm and the gradients are all-reduces."""
  result = run_module(["deeplab_jax.aot", "--config=configs/shapes.py", "--topology=v5e:2x2",
                       "--nosearch"], timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  out = _last_json(result.stdout)
  assert KEYS <= set(out) and KEYS - {"topology", "chips", "hosts", "chip", "dtype"} <= set(out["eval"])
  assert (out["topology"], out["chips"], out["hosts"], out["chip"]) == ("v5e:2x2", 4, 1, "v5e")
  assert out["fits"] and out["eval"]["fits"] and out["global_batch"] == 8
  assert 0 < out["peak_memory_per_chip_gib"] < out["usable_hbm_per_chip_gib"] == 15.75
  assert out["collectives"].get("all-reduce", 0) > 50  # one per BN layer's statistics, plus gradients
  config = load_config(os.path.join(REPO, "configs", "shapes.py"))
  forward = 2e9 * complexity.model_stats(config, 97)["gmacs"]
  assert 2.5 * forward < out["flops_per_image"] < 4 * forward
  assert 0 < out["predicted_mfu"] <= 1 and out["predicted_images_per_s_per_chip"] > 0
  assert out["predicted_step_s"] == pytest.approx(
      max(out["flops_per_image"] / 197e12, out["bytes_per_image"] / 819e9) * 2, rel=0.01)
  assert out["max_global_batch"] is None  # --nosearch
  table = result.stdout.strip().splitlines()
  assert table[0].startswith("v5e:2x2: 4 chips of TPU v5 lite on 1 host")
  assert [line.split()[0] for line in table[2:4]] == ["train", "eval"]


def test_a_multi_host_slice_compiles_over_all_its_hosts_devices():
  """v5e:4x4 is 16 chips on 4 hosts: the eval step (the cheaper compile) spans all of them, and its
  confusion matrix is summed across them."""
  config = load_config(os.path.join(REPO, "configs", "shapes.py"))
  config.model.depth_multiplier = 0.25
  config.eval.crop_size = (33, 33)
  config.eval.batch_size = 16
  out = aot.rehearse(config, "v5e:4x4", search=False, steps=("eval",))
  assert (out["chips"], out["hosts"], out["eval"]["fits"]) == (16, 4, True)
  assert out["eval"]["collectives"]["all-reduce"] > 0


@pytest.mark.parametrize("platform, devices, expected", [
    ("tpu", 4, "shift"), ("gpu", 8, "grouped"), ("cpu", 1, "native"), ("cpu", 8, "shift")])
def test_auto_depthwise_is_chosen_for_the_platform_the_program_is_for(platform, devices, expected):
  assert resolve_depthwise_impl("auto", platform, devices) == expected
  assert resolve_depthwise_impl("grouped", platform, devices) == "grouped"
  assert resolve_depthwise_impl("native", platform, devices) == ("native" if platform == "cpu" else "shift")


def test_a_model_for_a_tpu_is_traced_here_as_the_tpu_would_run_it():
  """Formulations are picked for the target platform, not for the CPU that traces the program: the
  CPU's C++ depthwise kernel never reaches a TPU or GPU program, and only GPUs get convolutions for
  the stem and the depthwise convs (CPUs and TPUs: patch matmuls and shift-and-accumulate)."""
  import jax
  import jax.numpy as jnp
  config = load_config(os.path.join(REPO, "configs", "shapes.py"))
  image = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)

  def convs(platform, devices):
    model = create_model(config, platform=platform, num_devices=devices)
    variables = jax.eval_shape(model.init, jax.random.key(0), image)
    text = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, image))
    return text.count("conv_general_dilated["), text.count("ffi_call"), model.depthwise_impl

  assert convs("cpu", 1) == (0, 22, "native")  # 22 depthwise convs, each a C++ kernel call
  assert convs("tpu", 4) == (0, 0, "shift")
  assert convs("gpu", 8) == (23, 0, "grouped")  # and the stem


def _fake_compiles(monkeypatch, usable_gib, base_gib, per_example_gib, fitted_share=1.0):
  """compile_step replaced by a line: memory = base + per_example * examples per device; the
  compiler fits what needs `fitted_share` of that (below 1: more than its figures suggest)."""
  calls = []

  def fake(config, mesh, step, global_batch):
    calls.append(global_batch)
    per_device = global_batch // mesh.size
    need = base_gib + per_example_gib * per_device
    if need * fitted_share > usable_gib:
      return aot.Compiled(step, global_batch, 1.0, fits=False, needed_gib=need)
    return aot.Compiled(step, global_batch, 1.0, fits=True,
                        memory={"peak": int(need * accelerators.GIB)})

  monkeypatch.setattr(aot, "compile_step", fake)
  return calls


class _Mesh:
  size = 4


@pytest.mark.parametrize("base, per_example, expected", [(1.0, 0.7, 84), (0.5, 3.0, 20), (15.0, 2.0, 0)])
def test_the_largest_batch_is_found_in_few_compiles(monkeypatch, base, per_example, expected):
  calls = _fake_compiles(monkeypatch, 15.75, base, per_example)
  first = aot.compile_step(None, _Mesh, "train", 8)
  best, at_best = aot.max_global_batch(None, _Mesh, "train", [first], limit=64, usable_gib=15.75)
  assert best == expected
  assert (at_best is None) if expected == 0 else (at_best.global_batch == best and at_best.fits)
  assert len(calls) <= 6, calls  # a line through two compiles lands next to the answer


@pytest.mark.parametrize("fitted_share, per_device, most_compiles", [(0.7, 26, 10), (0.5, 38, 11)])
def test_the_search_does_not_creep_where_the_compiler_fits_more_than_its_figures_say(
    monkeypatch, fitted_share, per_device, most_compiles):
  """Seen on v5e: the Xception-65 step compiled at 18 images per chip with memory figures above the
  usable HBM, so the line said each fitting batch was the largest and the search went up by one
  example per device per compile (12 and 24 compiles here); it doubles and bisects instead."""
  calls = _fake_compiles(monkeypatch, 15.75, 1.0, 0.8, fitted_share)
  first = aot.compile_step(None, _Mesh, "train", 16)
  best, _ = aot.max_global_batch(None, _Mesh, "train", [first], limit=256, usable_gib=15.75)
  assert best == per_device * 4
  assert len(calls) <= most_compiles, calls


def test_a_result_line_gives_back_the_compile_it_describes():
  """benchmarks/aot_table.py --search starts from an earlier rehearsal's JSON, not a recompile."""
  target = accelerators.parse("v3-8")  # 2 devices per chip
  memory = {"arguments": 10, "outputs": 5, "aliased": 5, "temporaries": 3 * 2**30, "code": 1,
            "peak": 3 * 2**30 + 11}
  compiled = aot.Compiled("train", 16, 12.0, fits=True, memory=memory, flops=4e12, bytes_accessed=2e11,
                          collectives={"all-reduce": 3})
  back = aot.from_summary(json.loads(json.dumps(aot.summary(compiled, target, None, 1e12))), target, "train")
  assert (back.global_batch, back.fits, back.memory, back.collectives) == (16, True, memory, {"all-reduce": 3})
  assert back.flops == pytest.approx(4e12) and back.bytes_accessed == pytest.approx(2e11)
  misfit = aot.Compiled("train", 64, 30.0, fits=False, needed_gib=20.0)
  assert aot.from_summary(aot.summary(misfit, target, None, 1e12), target, "train").needed_gib == 20.0


def test_a_misfit_names_the_largest_batch_that_fits():
  result = {"name": "v5e:2x2", "global_batch": 32, "fits": False, "max_global_batch": 20,
            "peak_memory_per_chip_gib": 25.1, "usable_hbm_per_chip_gib": 15.75}
  assert aot.misfit_line(result) == (
      "config.train.batch_size=32 does not fit v5e:2x2 (it needs 25.1 GiB per chip, 15.75 GiB are "
      "usable); the largest global batch that fits is 20: --config.train.batch_size=20")
  result["max_global_batch"] = 0
  assert "not even one example per device fits" in aot.misfit_line(result)
  result.update(fits=True, eval={"global_batch": 8, "fits": True})
  assert aot.misfit_line(result) is None


@pytest.mark.parametrize("name, topology, chips, hosts", [
    ("v5e:2x2", "v5e:2x2", 4, 1), ("v5litepod-8", "v5e:2x4", 8, 1), ("v5litepod-16", "v5e:4x4", 16, 4),
    ("v4-8", "v4:2x2x1", 4, 1), ("v4:2x2x2", "v4:2x2x2", 8, 2), ("v5p-8", "v5p:2x2x1", 4, 1),
    ("v3-8", "v3:2x2", 4, 1), ("v6e-8", "v6e:2x4", 8, 1), ("h100:8", "1x1x8", 8, 1),
    ("a100:2x8", "1x2x8", 16, 2)])
def test_slice_names_in_libtpu_cloud_and_gpu_forms(name, topology, chips, hosts):
  target = accelerators.parse(name)
  assert (target.topology, target.chips, target.hosts) == (topology, chips, hosts)


@pytest.mark.parametrize("name", ["v9:2x2", "v4:2x2", "v5e-3", "tpu"])
def test_a_name_that_is_no_slice_is_a_config_error(name):
  with pytest.raises(ConfigError, match="topology"):
    accelerators.parse(name)


@pytest.mark.parametrize("args, message", [
    (["--topology=v9:9"], r"--topology='v9:9' is not a slice name; use e\.g\. v5e:2x2"),
    (["--topology=v5e:2x2", "--config.train.batch_size=6"],
     r"config\.train\.batch_size=6 is not divisible by the 4 devices of the data axis; use a multiple of 4"),
])
def test_bad_input_is_one_line(args, message):
  import re
  result = run_module(["deeplab_jax.aot", "--config=configs/shapes.py", *args], timeout=120)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"deeplab_jax: error: " + message, last), result.stderr[-2000:]


def test_without_libtpu_the_line_says_how_to_install_it(tmp_path):
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError('not here')\n")
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")])}
  result = run_module(["deeplab_jax.aot", "--config=configs/shapes.py", "--topology=v5e:2x2"],
                      timeout=120, env=env)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'deeplab_jax: error: libtpu (the TPU compiler) is not installed; pip install "jax[tpu]==0.10.2" '
      '(Linux x86-64), or reinstall requirements.txt')


@pytest.mark.skipif("jax_plugins.xla_cuda12" not in sys.modules and not any(
    os.path.isdir(os.path.join(p, "jax_plugins", "xla_cuda12")) for p in sys.path),
    reason="JAX's CUDA plugin is not installed (pip install \"jax[cuda12]==0.10.2\")")
def test_gpus_compile_without_a_gpu():
  """The command line (which keeps JAX off an attached device: the CUDA plugin's version check needs
  a GPU driver otherwise) on 8 described H100s."""
  result = run_module(["deeplab_jax.aot", "--config=configs/shapes.py", "--topology=h100:8", "--nosearch"],
                      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = _last_json(result.stdout)
  assert out["fits"] and out["chips"] == 8 and out["chip"] == "h100" and out["eval"]["fits"]
  assert out["flops_per_image"] == out["model_flops_per_image"] > 0  # the model's: GPU programs have none
