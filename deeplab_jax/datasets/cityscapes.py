"""Cityscapes through TFDS's own `cityscapes/semantic_segmentation` builder (SPEC section 10).

That builder stores the 34 label ids of `*_gtFine_labelIds.png`; training and evaluation use the 19
train ids of the Cityscapes benchmark, everything else 255. The mapping is applied when labels are
decoded (`LABEL_TABLE`), so the TFDS data needs no rebuild of our own.
"""
from __future__ import annotations

import numpy as np

NAME = "cityscapes/semantic_segmentation"
ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
NUM_CLASSES = 19

# label id -> train id for the 19 evaluated classes (cityscapesScripts' labels.py); all others -> 255.
TRAIN_IDS = {
    7: 0,     # road
    8: 1,     # sidewalk
    11: 2,    # building
    12: 3,    # wall
    13: 4,    # fence
    17: 5,    # pole
    19: 6,    # traffic light
    20: 7,    # traffic sign
    21: 8,    # vegetation
    22: 9,    # terrain
    23: 10,   # sky
    24: 11,   # person
    25: 12,   # rider
    26: 13,   # car
    27: 14,   # truck
    28: 15,   # bus
    31: 16,   # train
    32: 17,   # motorcycle
    33: 18,   # bicycle
}
LABEL_TABLE = np.full(256, 255, np.uint8)
for _label_id, _train_id in TRAIN_IDS.items():
  LABEL_TABLE[_label_id] = _train_id

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle")
