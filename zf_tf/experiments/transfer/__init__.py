"""`--mode=transfer`: how well a trained ZFNet's features generalize to other datasets
(paper Sec. 5.2, Tables 4-6, Fig. 9).

The workdir's trained model is the source. Its layers 1-7 stay fixed: every image of the
target dataset goes through them once (center crop, inference mode) and the activations of
`config.transfer.feature_layer` (fc7 by default; any named layer, e.g. pool5 or fc6) are
cached in `WORKDIR/transfer/cache/<key>.npz`. A new softmax (a per-class sigmoid for
multi-label targets such as PASCAL VOC) is then trained on those features with N training
images per class, for each N in `config.transfer.per_class`, over `config.transfer.draws`
seeded draws; for comparison the same architecture is trained from scratch on the same
images. Results: mean and standard deviation per N of the mean per-class accuracy (mean
AP for multi-label targets) as JSON, a Table 4/5-style markdown table (Table 6-style AP
per class for multi-label targets) and a Fig. 9-style plot, in
`WORKDIR/transfer/<config.transfer.name>/<feature_layer>.{json,md,png}`.

Choices (the paper gives no more detail):
- sampling: per draw, each class's images are shuffled once (seed, draw) and the first N
  are the training images, so smaller N are subsets of larger ones. A class with fewer
  than N images (N + 1 when the test images are held out of the same split) is an error
  naming the largest usable N, not a silent skip. Multi-label: the union over classes of
  N images containing that class (every class gets at least N positives).
- test images: the target's `test_split`, or, if that is '', the images of `train_split`
  outside the draw's training images for every N (never overlapping them), at most
  `test_per_class` per class (0 = all; a seeded choice per draw).
- features: the unflipped center crop (the evaluation geometry of `build_inputs`).
- softmax: a Keras Dense layer fit full-batch with Adam from zero weights for a fixed
  number of steps, with L2 weight decay (`fits`); features are divided by their root mean
  square on the training images first. Zero initialization and full batches make it
  deterministic.
- from scratch: `build_model` with the source run's model section and the target's class
  count, seeded per (draw, N), SGD with the source run's learning rate and momentum for
  `scratch.epochs` epochs over the N-per-class images with the 10-crop training
  augmentation (a random one of the 10 crops per step, as in training), evaluated on the
  center crops of the same test images.
- metric: mean per-class accuracy (the Caltech protocol); multi-label: mean over classes
  of the average precision (VOC 2010+ definition: area under the monotone precision
  envelope, `average_precision`).

Modules: `target` (config.transfer -> the target dataset), `images` (its records, center
crops, encoded bytes), `features` (the source model's activations, cached), `sampling`
(N per class, test images), `fits` (the linear classifier, also used by
bench/linear_probe.py), `metrics`, `scratch` (the from-scratch baseline), `report`
(tables, figure, JSON) and `mode` (`run`, `run_mode`).
"""

from zf_tf.experiments.transfer.mode import run, run_mode
from zf_tf.experiments.transfer.target import CONFIGS, MODE, check_config

__all__ = ["CONFIGS", "MODE", "check_config", "run", "run_mode"]
