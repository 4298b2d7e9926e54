"""ZFNet on Imagenette (10 easy ImageNet classes, real photographs), scaled for 2 CPU cores.

Run (Imagenette as class folders train/<wnid>/ and val/<wnid>/; shards prepared once, raw
uint8 squares, about 1 minute, then training from them):
  python main.py --mode=prepare --config=configs/imagenette.py \\
      --config.data.folder=../shared/data/imagenette \\
      --config.data.prepared_dir=runs/imagenette_prepared
  python main.py --mode=train --strategy=mirrored --config=configs/imagenette.py \\
      --config.data.source=prepared --config.data.prepared_dir=runs/imagenette_prepared \\
      --workdir=runs/imagenette
On a machine with internet, from tfds instead of a folder (its eval split is `validation`):
  --config.data.source=tfds --config.data.name=imagenette/160px-v2 \\
  --config.data.eval_split=validation
(then `--mode=prepare` the same way). `bash bench/imagenette.sh` runs it all, figures too.
Analysis modes take `--config=configs/imagenette.py` too (their `val` split, Fig. 7 classes).

Reaches (2-core CPU, mirrored, 70 epochs; BUILD.md "Imagenette" has every run): with
seed 1, 82.8% validation top-1 with 10 crops (80.6% center crop; top-5 98.1%) after 56.3
minutes of training (the sum of history.csv's epoch_seconds, 17 of its epochs beside the
test suite; 58 minutes for the whole command, eval and export included); the center crop
first reached 80% at epoch 51, after 42 min. Seed 0: 82.8% too (80.7% center, top-5
98.0%; center crop 80% from epoch 50; its times are not a measurement: it shared the
machine). Seed 2: 82.6% (80.8% center, top-5 97.8%). Seed 0 with the plateau schedule
reached 82.4% (80.4% center), dividing the rate after epochs 42 and 58: the step schedule
below takes its epochs from that run.
The keras.io "Image classification from scratch" model on the same data, size and cores
reaches 10.2% (one class for every photo) in 60 minutes: 6 epochs of a model 12x as costly
per image, its batch-norm statistics not settled (bench/baseline.py; BUILD.md).
Training throughput as configured: 205 images/s from the prepared shards, 188 from the
JPEGs (bench/train.py --config imagenette --strategy mirrored; BUILD.md).

Kept from the paper: the topology and layer names (conv1 7x7/2, overlapping 3x3/2 max pools,
LRN, conv3-5, fc6, fc7 with dropout 0.5), SGD with momentum 0.9, 10-crop evaluation, filter
RMS renormalization (radius 0.1), the learning rate divided by 10 twice, mean-subtracted RGB
input.

Scale, each measured (10 training steps on synthetic batches after 2 of warm-up, global
batch 64, 2 mirrored CPU replicas, one fresh process per setting, one round: bench/train.py's
`images_per_s`; rerun one with `.venv/bin/python bench/train.py --config imagenette --only
mirrored --batch_size 64 --steps 10 --set data.crop_size=112 model.width=0.5`):
- 112 px crops of 128 px squares (paper: 224 of 256): 223 images/s at width 0.5; 128 of 144
  runs at 118, 144 of 160 at 116: 112 px gives about twice the epochs in the same time. At
  112 px conv5 is 6x6 and pool5 2x2 (13x13 and 6x6 in the paper).
- width 0.5 (48..192 conv maps, 2048-unit fc6/fc7): at 128 px width 0.75 runs at 99 and
  width 1.0 at 60 images/s.
- 70 epochs: about 43 s each (training and validation), 50-55 minutes of training.

Departures from the paper's recipe, and why:
- He-normal initialisation and inputs scaled by 1/64 (configs/default.py: N(0, 0.01)
  learns very slowly in an 8-layer net without normalization at CPU budgets). Its cost:
  conv1's filters keep most of their random initial values (cosine 0.77 to them after 70
  epochs). `--config.model.conv1_init_stddev=0.01` (conv1 alone from N(0, 0.01)) learns
  clean layer-1 filters (cosine 0.22) but reached 79.4% instead of 82.4% in one run
  (BUILD.md, runs C and D); not adopted yet.
- A linear learning-rate warmup over the first epoch (`train.warmup_epochs=1`). Measured
  (2 epochs each, this config with `data.augment=ten_crop`): without it validation top-1
  after epochs 1 and 2 was 0.145 and 0.289 (a user's first try stayed at chance, 0.099, at
  the same learning rate); with it 0.236 and 0.405, and 0.622 after 6 epochs.
- Scale augmentation (`data.augment=scale`: a random window of 25-100% of the square's
  area, aspect 3/4-4/3, resized to 112 px, flipped at random) instead of the paper's
  choice of 10 fixed crops: 9,469 training photos seen 70 times each need more variety than
  10 crops per photo give. Evaluation still averages the paper's 10 crops.
- Weight decay 5e-3 in Keras' decoupled form (the weights shrink by learning rate x 5e-3
  per step: as much as AlexNet's L2 penalty of 5e-4 under momentum 0.9); the paper names
  none.
- The rate divided after fixed epochs, 42 and 59 (`train.lr_drop_epochs`), not on
  validation-loss plateaus: with scale augmentation the validation loss is noisy, and the
  plateau rule (ReduceLROnPlateau, patience 5) fired after epoch 15 with seed 1 (validation
  loss 1.04 at epoch 10, then five epochs at 1.09-1.17), then after 27, at the 1e-4 floor:
  78.0% (at patience 3, run B, also after epoch 15). With seed 0 it fired after 42 and 58:
  82.4%. The fixed schedule at those epochs gives seed 1 82.8% (BUILD.md, runs C_seed1,
  E_steps_seed1).
"""

from zf_tf.configs import default

CLASS_NAMES = (
    ("n01440764", "tench"),
    ("n02102040", "English springer"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute"),
)


def get_config():
    config = default.get_config()
    config.data.source = "folder"
    config.data.folder = "../shared/data/imagenette"
    config.data.eval_split = "val"
    config.data.resize_size = 128
    config.data.crop_size = 112
    config.data.num_classes = 10
    config.data.augment = "scale"
    config.data.min_crop_area = 0.25
    config.analysis.split = "val"
    # The folders (and tfds' labels) are ImageNet synsets; figures show these names.
    config.analysis.class_names = dict(CLASS_NAMES)
    # Fig. 7 on photos whose object is localized (the first val photo of each).
    config.analysis.occlusion.classes = (
        "church",
        "parachute",
        "golf ball",
        "gas pump",
        "English springer",
    )
    config.analysis.occlusion.num_images = 5
    config.model.width = 0.5
    config.train.batch_size = 64
    config.train.epochs = 70
    config.train.learning_rate = 0.01
    config.train.warmup_epochs = 1.0
    config.train.weight_decay = 5e-3
    config.train.lr_drop_epochs = (42, 59)  # fixed: plateaus fire early on noisy val loss
    config.train.lr_patience = 5  # the plateau schedule's, with lr_drop_epochs=()
    config.train.min_lr = 1e-4
    config.prepare.encoding = "raw"
    return config
