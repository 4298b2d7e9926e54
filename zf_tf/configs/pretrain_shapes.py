"""Source run for the transfer experiment on the embedded dataset: ZFNet trained on 5 of
the 10 `zf_shapes` classes (circle, square, triangle, star, cross); the other 5 (ring,
semicircle, crescent, arrow, letter_l) are the transfer target (configs/transfer_shapes.py).

Run:  python main.py --mode=train --config=configs/pretrain_shapes.py --workdir=workdir_pretrain
then  python main.py --mode=transfer --config=configs/transfer_shapes.py --workdir=workdir_pretrain

The default config otherwise (64 px crops, width 0.25); `data.classes` keeps classes 0-4
(relabelled 0-4), so an epoch is 6000 images. 16 epochs (1488 SGD steps, fewer than the
default run's 2250) take about 5 minutes of CPU time on 2 cores (measured: 5.4 CPU-minutes;
18.5 minutes wall on a machine shared with other jobs) and should reach about 99% validation
top-1 on the 5 source classes (measured: 0.6% top-1 error, 10 crops and center crop).
"""

from zf_tf.configs import default

SOURCE_CLASSES = (0, 1, 2, 3, 4)


def get_config():
    config = default.get_config()
    config.data.classes = SOURCE_CLASSES
    config.data.num_classes = len(SOURCE_CLASSES)  # a FieldReference: the model's too
    config.train.epochs = 16
    return config
