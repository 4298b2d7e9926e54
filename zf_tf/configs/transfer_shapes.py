"""Transfer on the embedded dataset (the CPU-scale stand-in for paper Sec. 5.2, Fig. 9):
features of a ZFNet trained on 5 `zf_shapes` classes (configs/pretrain_shapes.py), a new
softmax on the other 5 (ring, semicircle, crescent, arrow, letter_l) with 1-60 training
images per class, against the same net trained from scratch on those images.

Run:  python main.py --mode=train --config=configs/pretrain_shapes.py --workdir=workdir_pretrain
      python main.py --mode=transfer --config=configs/transfer_shapes.py --workdir=workdir_pretrain

Outputs: workdir_pretrain/transfer/shapes/fc7.{json,md,png}; features cached in
workdir_pretrain/transfer/cache/ (a second run reuses them). Test images: the 500
validation images of the 5 target classes (chance: 20%). Should reach (measured,
docs/analyses.md): fc7 features + softmax 40.5 ± 6.8% mean per-class accuracy
with 1 image per class, 52.3 ± 1.2% with 10 and 58.8 ± 1.9% with 60; the same net from
scratch (30 epochs over the N images) 19.4 ± 0.8%, 21.1 ± 0.9% and 29.8 ± 1.7%. Any
layer: --config.transfer.feature_layer=pool5 (or fc6, conv5, ...).
"""

from zf_tf.configs import default, pretrain_shapes

TARGET_CLASSES = tuple(c for c in range(10) if c not in pretrain_shapes.SOURCE_CLASSES)


def get_config():
    config = default.get_config()
    t = config.transfer
    t.name = "shapes"
    t.per_class = (1, 5, 10, 15, 30, 60)
    t.draws = 3
    t.data.source = "embedded"
    t.data.name = "zf_shapes"
    t.data.tfds_config = "default"
    t.data.train_split = "train"
    t.data.test_split = "validation"
    t.data.classes = TARGET_CLASSES
    t.scratch.epochs = 30
    return config
