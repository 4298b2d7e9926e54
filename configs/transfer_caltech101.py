"""Transfer to Caltech-101 (paper Sec. 5.2, Table 4) from an ImageNet-trained workdir.

Run (tfds prepares `caltech101` on first use: it downloads it, about 130 MB):
  python main.py --mode=transfer --config=configs/transfer_caltech101.py \
      --workdir=runs/zfnet_imagenet
The workdir holds a run of configs/zfnet_imagenet.py (its fc7 features, 224 px center
crops of 256 px images). From image folders instead (root/<class>/*.jpg):
  --config.transfer.data.source=folder --config.transfer.data.folder=/data/101_ObjectCategories

Protocol (the paper follows Bo et al.): 15 or 30 random training images per class, test on
up to 50 of the remaining images per class, mean per-class accuracy over 5 draws. tfds'
`train` split is a fixed 30 per class, so the draws come from `train+test` together and the
test images are held out of it. tfds' caltech101 has 102 classes (101 + background_google).
Should reach (paper Table 4): 83.8 ± 0.5% at 15/class and 86.5 ± 0.5% at 30/class; the
network trained from scratch reaches 22.8 ± 1.5% and 46.5 ± 1.7% there.
"""

from configs import default


def get_config():
    config = default.get_config()
    t = config.transfer
    t.name = "caltech101"
    t.per_class = (15, 30)
    t.draws = 5
    t.test_per_class = 50
    t.data.source = "tfds"
    t.data.name = "caltech101"
    t.data.train_split = "train+test"
    t.data.test_split = ""  # held out of train+test, never overlapping the training images
    t.scratch.epochs = 30
    return config
