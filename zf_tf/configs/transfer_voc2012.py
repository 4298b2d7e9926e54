"""Transfer to PASCAL VOC 2012 classification (paper Sec. 5.2, Table 6) from an
ImageNet-trained workdir: a multi-label target, so one sigmoid per class instead of the
softmax, and the metric is the mean over the 20 classes of the average precision.

Run (tfds prepares `voc/2012` on first use: it downloads the 2 GB trainval tar):
  python main.py --mode=transfer --config=configs/transfer_voc2012.py \
      --workdir=runs/zfnet_imagenet

Each image's label vector is the set of its objects' classes (`objects/label`, difficult
objects included). Trained on `train`, tested on `validation` (the test set's labels are not
public; the paper's numbers are on the test server). per_class 0 is the whole training set,
as in Table 6; smaller N draw at least N images of every class. Should reach (paper Table
6, test set): 79.0% mean AP with the full training set.
"""

from zf_tf.configs import default


def get_config():
    config = default.get_config()
    t = config.transfer
    t.name = "voc2012"
    t.per_class = (15, 30, 60, 0)
    t.draws = 3
    t.data.source = "tfds"
    t.data.name = "voc/2012"
    t.data.train_split = "train"
    t.data.test_split = "validation"
    t.data.label_key = "objects/label"
    t.data.multi_label = True
    t.scratch.epochs = 30
    return config
