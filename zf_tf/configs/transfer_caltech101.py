"""Transfer to Caltech-101 (paper Sec. 5.2, Table 4, Fig. 9) from a trained workdir.

Run, from the Imagenette model (configs/imagenette.py) and an image folder of Caltech-101
(root/<class>/*.jpg, the background class left out), `:folder` selecting that source:
  python main.py --mode=transfer --config=configs/transfer_caltech101.py:folder \\
      --config.transfer.data.folder=../shared/data/caltech101 --workdir=runs/imagenette
or from tfds (`caltech101`; tfds downloads it on first use, about 130 MB):
  python main.py --mode=transfer --config=configs/transfer_caltech101.py \\
      --workdir=runs/zfnet_imagenet
The workdir's model gives the features (its fc7, center crops at its own geometry); the
same architecture is also trained from scratch on the same images.

Protocol (the paper follows Bo et al.): N random training images per class for N in 5,
10, 15, 20, 30 (the paper's Table 4 uses 15 and 30; Fig. 9 the curve over N), tested on up
to 50 of the remaining images per class, mean per-class accuracy over 5 draws. tfds'
`train` split is a fixed 30 per class, so the draws come from `train+test` together and the
test images are held out of it; a folder's images are all one pool (`train+validation`).
tfds' caltech101 has 102 classes (101 + background_google).
Paper (Table 4), from ImageNet's 1.3 million images: 83.8 ± 0.5% at 15/class and
86.5 ± 0.5% at 30/class; the network trained from scratch: 22.8 ± 1.5% and 46.5 ± 1.7%.
"""

from zf_tf.configs import default

SOURCES = ("tfds", "folder")


def get_config(source: str = "tfds"):
    if source not in SOURCES:
        raise ValueError(f"transfer_caltech101: source must be one of {', '.join(SOURCES)}")
    config = default.get_config()
    t = config.transfer
    t.name = "caltech101"
    t.per_class = (5, 10, 15, 20, 30)
    t.draws = 5
    t.test_per_class = 50
    t.scratch.epochs = 30
    if source == "folder":
        t.data.source = "folder"
        t.data.folder = "../shared/data/caltech101"
        t.data.train_split = "train+validation"  # every file of the folder
        t.data.test_split = ""  # held out of it, never overlapping the training images
        return config
    t.data.source = "tfds"
    t.data.name = "caltech101"
    t.data.train_split = "train+test"
    t.data.test_split = ""  # held out of train+test, never overlapping the training images
    return config
