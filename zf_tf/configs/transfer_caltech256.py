"""Transfer to Caltech-256 (paper Sec. 5.2, Table 5, Fig. 9) from an ImageNet-trained
workdir. tfds 4.9 has no Caltech-256 builder, so the images come from the extracted
256_ObjectCategories folder (one subfolder per class, e.g. 001.ak47/...).

Run:
  python main.py --mode=transfer --config=configs/transfer_caltech256.py \
      --workdir=runs/zfnet_imagenet \
      --config.transfer.data.folder=/data/256_ObjectCategories

Protocol: 15, 30, 45 or 60 random training images per class, test on up to 25 of the
remaining images of each class (the smallest class has 80), mean per-class accuracy over 5
draws. The 256 object classes only: `classes` leaves out the last subfolder, 257.clutter.
`train+validation` is every file of the folder (a folder without split subfolders is
divided 90/10 into 'train' and 'validation'). Should reach (paper Table 5): 65.7 ± 0.2%
at 15/class, 70.6 ± 0.2% at 30, 72.7 ± 0.4% at 45 and 74.2 ± 0.3% at 60/class, far above
the network trained from scratch (38.8 ± 1.4% at 60/class), as plotted in Fig. 9.
"""

from zf_tf.configs import default


def get_config():
    config = default.get_config()
    t = config.transfer
    t.name = "caltech256"
    t.per_class = (15, 30, 45, 60)
    t.draws = 5
    t.test_per_class = 25
    t.data.source = "folder"
    t.data.folder = ""  # --config.transfer.data.folder=/path/to/256_ObjectCategories
    t.data.train_split = "train+validation"
    t.data.test_split = ""  # held out, never overlapping the training images
    t.data.classes = tuple(range(256))  # without 257.clutter
    t.scratch.epochs = 30
    return config
