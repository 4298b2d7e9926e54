"""Architecture ablations of the paper's Table 3, one variant per config.

The variant is the config file's argument (default `baseline`, the Fig. 3 model); the
variants and their model fields are VARIANTS below (data; `--mode=ablate` reads them):
  baseline, no_conv3_conv4, no_fc7, no_fc6_fc7, no_conv3_conv4_fc6_fc7, fc_2048, fc_8192,
  conv_512_1024_512, conv_512_1024_512_fc_8192, alexnet_layer1.
Everything else is configs/default.py (embedded dataset, CPU-sized; unit counts scale with
`model.width` like every other layer).

Run one variant on its own (the full default budget, 12 epochs):
  python main.py --mode=train --config=configs/ablations.py:no_fc7 --workdir=runs/no_fc7

Run all of them with one shared budget (config.ablate; the base config is --config, so
`--config=configs/zfnet_imagenet.py` gives the paper's ImageNet version), writing the
Table 3-style table to WORKDIR/ablate/table.md and table.json:
  python main.py --mode=ablate --workdir=workdir
  python main.py --mode=ablate --workdir=workdir --config.ablate.variants=baseline,no_fc7

Expected on the embedded dataset with the default ablation budget (3 epochs each; all ten
in about 20 min on a quiet 2-core CPU, 53 min measured on a busy one): the baseline near 61%
val top-1 error, the variants without fc6/fc7 near 26-31% (they learn fastest at this
budget); see docs/analyses.md for the table. In the paper (ImageNet, 70
epochs) the conv3-5 widening helps a little, the fc6/fc7 sizes matter little, removing
conv3/conv4 or fc6/fc7 alone costs a few points, and removing both costs a lot.

An unknown variant is an error naming the valid ones.
"""

import copy

from zf_tf.configs import default

# The Fig. 3 architecture. A variant sets all of these fields (its changes on top), so it is
# the same network whatever architecture the base config has; width, input size, init, data
# and training come from the base config.
FIG3 = {
    "layer1": "zfnet",
    "conv_filters": (96, 256, 384, 384, 256),
    "fc_units": (4096, 4096),
    "remove": (),
}

# name -> (the paper's Table 3 row, changes to FIG3). Unit counts are the paper's.
VARIANTS = {
    "baseline": ("Our model (Fig. 3)", {}),
    "no_conv3_conv4": ("Removed layers 3,4", {"remove": ("conv3", "conv4")}),
    "no_fc7": ("Removed layer 7", {"remove": ("fc7",)}),
    "no_fc6_fc7": ("Removed layers 6,7", {"remove": ("fc6", "fc7")}),
    "no_conv3_conv4_fc6_fc7": (
        "Removed layers 3,4,6,7",
        {"remove": ("conv3", "conv4", "fc6", "fc7")},
    ),
    "fc_2048": ("Layers 6,7: 2048 units", {"fc_units": (2048, 2048)}),
    "fc_8192": ("Layers 6,7: 8192 units", {"fc_units": (8192, 8192)}),
    "conv_512_1024_512": (
        "Layers 3,4,5: 512,1024,512 maps",
        {"conv_filters": (96, 256, 512, 1024, 512)},
    ),
    "conv_512_1024_512_fc_8192": (
        "Layers 3,4,5: 512,1024,512 maps and layers 6,7: 8192 units",
        {"conv_filters": (96, 256, 512, 1024, 512), "fc_units": (8192, 8192)},
    ),
    "alexnet_layer1": ("Layer 1: 11x11 filters, stride 4 (AlexNet, Fig. 6)", {"layer1": "alexnet"}),
}


def set_variant(config, variant: str):
    """Sets the architecture fields (FIG3's keys) of the ablation `variant` in `config`.

    Args:
      config: an experiment ConfigDict.
      variant: a key of VARIANTS.

    Returns:
      `config`.

    Raises:
      ValueError: unknown variant, naming the valid ones.
    """
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown ablation variant {variant!r}: valid variants: {', '.join(VARIANTS)}"
        )
    for key, value in {**FIG3, **VARIANTS[variant][1]}.items():
        setattr(config.model, key, copy.deepcopy(value))
    return config


def get_config(variant: str = "baseline"):
    return set_variant(default.get_config(), variant)
