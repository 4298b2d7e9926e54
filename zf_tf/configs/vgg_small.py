"""A small VGG-style convnet with batch normalization on the embedded dataset: a model that is
not ZFNet, for looking inside with the same tools (README "Look inside your own model").

Run:
  python main.py --mode=train --config=configs/vgg_small.py --workdir=workdir_vgg
  python main.py --mode=deconv --model=workdir_vgg/checkpoints/model.keras \
      --workdir=workdir_vgg --layer=block3_relu2

Three blocks of [3x3 conv -> BatchNormalization -> ReLU] x 2 and a 2x2 max pool (32, 64,
128 maps), global average pooling, dropout and the logits: 290k parameters at 64 px. The
training recipe is the default config's (10-crop augmentation, SGD with momentum, learning
rate annealed on plateaus) at learning rate 0.02 for 12 epochs. Measured on the 2-core CPU
machine (shared with other work: 17 min wall, 18 min CPU): validation top-1 error 0.5%
with 10 crops, 2.0% with the center crop (ZFNet's default: 5.3% / 10.1%). The
feature-evolution snapshots are off: they tap ZFNet's conv1..conv5 by name.
"""

from zf_tf.configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "vgg"
    config.model.vgg_blocks = ((32, 2), (64, 2), (128, 2))  # (maps, convs) per block
    config.model.dropout = 0.3
    config.train.epochs = 12
    config.train.learning_rate = 0.02
    config.train.lr_patience = 3
    config.train.callbacks = ("image_summaries",)
    return config
