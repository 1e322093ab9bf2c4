"""The synthetic shapes data: deterministic, all classes present, class not predictable from color."""
import numpy as np

from deeplab_jax.datasets import shapes


def test_same_seed_same_examples_other_seed_different():
  a = list(shapes.generate_split(7, 3))
  b = list(shapes.generate_split(7, 3))
  c = list(shapes.generate_split(8, 3))
  for (ia, la), (ib, lb) in zip(a, b):
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)
  assert not all(ia.shape == ic.shape and np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c))


def test_examples_have_varied_sizes_valid_labels_and_every_class():
  examples = list(shapes.generate_split(0, 40))
  sizes = {im.shape[:2] for im, _ in examples}
  assert len(sizes) > 20
  classes = set()
  for image, label in examples:
    assert image.dtype == np.uint8 and image.shape[2] == 3 and label.shape == image.shape[:2]
    assert label.max() < shapes.NUM_CLASSES
    classes |= set(np.unique(label).tolist())
  assert classes == set(range(shapes.NUM_CLASSES))


def test_color_does_not_give_the_class():
  """Pixel colors of the five object classes overlap: the nearest class-mean color is near chance."""
  pixels = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for image, label in shapes.generate_split(1, 60):
    for c in pixels:
      pixels[c].append(image[label == c][::7].astype(np.float64))
  pixels = {c: np.concatenate(v) for c, v in pixels.items()}
  means = np.array([v.mean(0) for v in pixels.values()])
  assert np.all(np.abs(means - means.mean(0)) < 30)  # every class spans the color space alike
  assert all(v.std(0).min() > 30 for v in pixels.values())
  colors = np.concatenate(list(pixels.values()))
  truth = np.concatenate([np.full(len(v), k) for k, v in enumerate(pixels.values())])
  nearest = ((colors[:, None] - means[None]) ** 2).sum(-1).argmin(-1)
  assert (nearest == truth).mean() < 0.35  # chance is 0.2


def test_the_pattern_is_a_local_cue():
  """Inside an object, neighboring pixels already tell plain from patterned: the fraction of pixel
  pairs (across and down) whose colors jump separates them, whatever the outline and colors."""
  jumps = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for image, label in shapes.generate_split(2, 40):
    image = image.astype(np.float64)
    fractions = {c: [0, 0] for c in jumps}
    for axis in (0, 1):
      jump = np.linalg.norm(np.diff(image, axis=axis), axis=-1) > 50
      first, second = (label[1:], label[:-1]) if axis == 0 else (label[:, 1:], label[:, :-1])
      for c in jumps:
        inside = (first == c) & (second == c)
        fractions[c][0] += jump[inside].sum()
        fractions[c][1] += inside.sum()
    for c, (count, total) in fractions.items():
      if total > 200:
        jumps[c].append(count / total)
  plain = shapes.CLASS_NAMES.index("plain")
  assert all(len(v) > 5 for v in jumps.values())
  assert max(jumps[plain]) < 0.03
  assert all(min(v) > 0.06 for c, v in jumps.items() if c != plain)
