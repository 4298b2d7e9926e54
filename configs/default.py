"""Default config: ZFNet scaled down for a 2-core CPU, on the embedded `zf_shapes` dataset.

Run:  python main.py --mode=train --strategy=mirrored        (this config is the default)
      python main.py --mode=train --config=configs/default.py --config.train.epochs=2

The dataset is generated on first use (no download) into `data.data_dir`.

Differences from the paper (configs/zfnet_imagenet.py keeps the paper's values), and why:
- input 64 px crops of 72 px images (paper: 224 of 256) and width 0.25 (24..96 conv maps,
  1024-unit fc layers) so an epoch takes seconds on 2 cores; the topology and layer names
  are the paper's;
- He-normal initialisation instead of N(0, 0.01): with few epochs and no batch norm, the
  paper's initialisation learns very slowly in an 8-layer net (GUIDE §1, training recipe);
  He-normal assumes unit-variance inputs, so the model scales the mean-subtracted pixels
  by 1/64 first (`model.input_scale`; the paper's is 1).
"""

import ml_collections

# ImageNet per-channel RGB means, used as "the mean" for every dataset unless overridden.
IMAGENET_MEAN = (123.68, 116.78, 103.94)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Shared by data and model: overriding either side changes both.
    crop_size = ml_collections.FieldReference(64)
    num_classes = ml_collections.FieldReference(10)

    config.data = ml_collections.ConfigDict()
    # 'embedded' (generated zf_shapes), 'tfds' (any tfds image dataset by name) or 'folder'
    # (a folder of class subfolders holding JPEG/PNG files, ImageNet layout).
    config.data.source = "embedded"
    config.data.name = "zf_shapes"  # tfds name when source == 'tfds'
    config.data.tfds_config = "default"  # builder config of the embedded dataset
    config.data.data_dir = ""  # tfds data dir; '' = $ZF_TF_DATA_DIR or ~/tensorflow_datasets
    config.data.manual_dir = ""  # tfds manual-download dir (imagenet2012)
    config.data.folder = ""  # root of class subfolders when source == 'folder'
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.num_classes = num_classes
    config.data.resize_size = 72  # S: shorter side resized to S, then center S x S
    config.data.crop_size = crop_size  # s: one of the 10 s x s sub-crops
    config.data.mean = IMAGENET_MEAN
    config.data.shuffle_buffer = 4096
    config.data.cache = True  # decode once, keep S x S squares in memory (small datasets)
    config.data.input_threads = 1  # tf.data threads; 0 = as many as cores

    config.model = ml_collections.ConfigDict()
    config.model.input_size = crop_size
    config.model.num_classes = num_classes
    config.model.width = 0.25
    config.model.layer1 = "zfnet"  # 'zfnet' (7x7/2) or 'alexnet' (11x11/4; Fig. 6, Table 3)
    config.model.conv_filters = (96, 256, 384, 384, 256)
    config.model.fc_units = (4096, 4096)
    config.model.dropout = 0.5
    config.model.kernel_init = "he_normal"  # 'paper' = N(0, init_stddev)
    config.model.init_stddev = 0.01
    config.model.input_scale = 1 / 64  # paper: 1 (pixels minus mean, about +-128)
    config.model.max_filter_rms = 0.1  # 0 disables filter renormalization
    config.model.lrn = dict(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
    config.model.seed = 0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64  # global batch, split across replicas
    config.train.eval_batch_size = 64
    config.train.epochs = 12
    config.train.learning_rate = 0.01
    config.train.momentum = 0.9
    config.train.steps_per_epoch = 0  # 0 = one pass over the training split
    config.train.cpu_replicas = 2  # logical CPU devices for --strategy=mirrored without GPUs
    config.train.lr_decay = 0.1  # ReduceLROnPlateau on validation loss: factor,
    config.train.lr_patience = 2  # epochs without improvement,
    config.train.min_lr = 1e-5  # and floor
    return config
