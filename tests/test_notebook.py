"""notebooks/quickstart.ipynb runs: its code cells, in order, in one namespace, as Jupyter would."""
import ast
import json
import os

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def run_notebook(path: str) -> tuple[dict, list]:
  """Executes the code cells; shell (`!`) and magic (`%`) lines are skipped: they only install.
  Returns the namespace and each cell's displayed value (its last expression, or None)."""
  with open(path) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace, shown = {"__name__": "__main__"}, []
  for index, cell in enumerate(cells):
    lines = "".join(cell["source"]).splitlines()
    source = "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, f"<cell {index}>", "exec"), namespace)
    shown.append(eval(compile(ast.Expression(last.value), f"<cell {index}>", "eval"), namespace)
                 if last else None)
  return namespace, shown


def test_only_the_install_cell_has_shell_or_magic_lines():
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  special = [i for i, c in enumerate(cells)
             if any(line.lstrip().startswith(("!", "%")) for line in c["source"])]
  assert special == [0], "the test skips ! and % lines; keep them to the install cell"


def test_quickstart_notebook_loads_a_workdir_predicts_and_shows_the_overlay(step_facts, zoo_tarball,
                                                                             monkeypatch, tmp_path):
  # A finished workdir (the 8-device test run's checkpoint) stands in for training: training is
  # tested by test_train; this test is about the notebook's code, in seconds. The pretrained path
  # reads a model-zoo tarball as downloaded.
  monkeypatch.setenv("DEEPLAB_WORKDIR", str(step_facts["workdir"]))
  monkeypatch.setenv("DEEPLAB_PRETRAINED", str(zoo_tarball[0]))
  monkeypatch.chdir(REPO)
  namespace, shown = run_notebook(NOTEBOOK)
  assert namespace["zoo"].class_names[0] == "background" and namespace["zoo_labels"].shape == (120, 150)
  image, labels = namespace["image"], namespace["labels"]
  assert labels.shape == image.shape[:2] == (120, 150)
  assert namespace["predictor"].step == 2
  overlays = [v for v in shown if isinstance(v, Image.Image)]
  assert [o.size for o in overlays] == [(2 * 150, 120), (2 * 3 * 150, 2 * 120)]
  assert namespace["probs"].shape == (120, 150, namespace["predictor"].num_classes)
  # That workdir was not written by train_and_evaluate: the curve and example cells say so, and show a
  # run's pictures where they exist.
  assert sum("does not exist" in v for v in shown if isinstance(v, str)) == 2
  Image.new("RGB", (6, 4)).save(tmp_path / "curves.png")
  namespace["WORKDIR"] = str(tmp_path)
  assert namespace["show"]("curves.png").size == (6, 4)
