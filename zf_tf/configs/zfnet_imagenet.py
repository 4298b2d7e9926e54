"""The paper's setup (Zeiler & Fergus 2014, Sec. 3) on ImageNet 2012 via tfds.

Run (the ILSVRC2012 tars in the manual dir; tfds prepares them on first use):
  python main.py --mode=train --strategy=mirrored --config=configs/zfnet_imagenet.py \
      --config.data.manual_dir=/data/imagenet --workdir=runs/zfnet_imagenet

Expected after 70 epochs: validation top-1 / top-5 error about 38.4% / 16.5% (1 convnet,
10 crops; paper Table 2). The paper trained about 12 days on one GTX580.

Everything is the paper's: 224 crops of 256 images, full width, N(0, 0.01) weights, zero
biases, mean-subtracted pixels at scale 1, SGD lr 0.01 with momentum 0.9 and batch 128,
dropout 0.5, filter RMS radius 0.1, learning rate annealed on plateaus.
"""

from zf_tf.configs import default


def get_config():
    config = default.get_config()
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.num_classes = 1000
    config.data.resize_size = 256
    config.data.crop_size = 224
    config.data.shuffle_buffer = 16384
    config.data.cache = False  # 140 GB of JPEGs do not fit in memory
    config.data.input_threads = 0  # decoding JPEGs needs every core it can get

    config.model.width = 1.0
    config.model.kernel_init = "paper"
    config.model.init_stddev = 0.01
    config.model.input_scale = 1.0

    config.train.batch_size = 128
    config.train.eval_batch_size = 128
    config.train.epochs = 70
    config.train.learning_rate = 0.01
    config.train.momentum = 0.9
    config.train.lr_patience = 3
    return config
