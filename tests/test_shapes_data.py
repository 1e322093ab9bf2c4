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
  """Mean shape colors of two classes overlap: a per-pixel color classifier cannot separate them."""
  colors = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for image, label in shapes.generate_split(1, 60):
    for c in colors:
      if (label == c).sum() > 50:
        colors[c].append(image[label == c].mean(0))
  means = np.array([np.mean(v, 0) for v in colors.values()])
  assert np.all(np.abs(means - means.mean(0)) < 40)  # every class spans the color space alike
  assert all(np.std(v, 0).min() > 40 for v in colors.values())
