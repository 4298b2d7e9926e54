"""ZFNet on Imagenette (10 ImageNet classes, real photographs), scaled for a 2-core CPU.

Draft: the recipe is being measured (see BUILD.md).
"""

from configs import default


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
    # Fig. 7 on photos whose object is localized: church, parachute, golf ball, gas pump,
    # English springer (2 each).
    config.analysis.occlusion.classes = (
        "n03028079",
        "n03888257",
        "n03445777",
        "n03425413",
        "n02102040",
    )
    config.analysis.occlusion.num_images = 10
    config.model.width = 0.5
    config.train.batch_size = 64
    config.train.epochs = 70
    config.train.learning_rate = 0.01
    config.train.warmup_epochs = 1.0
    config.train.weight_decay = 5e-3
    config.train.lr_patience = 5
    config.train.min_lr = 1e-4
    config.prepare.encoding = "raw"
    return config
