"""Architecture ablations of the paper's Table 3, one variant per config.

The variant is the config file's argument (default `baseline`, the Fig. 3 model); the
variants and their model fields are zf_tf/ablate.py's VARIANTS:
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

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for zf_tf.ablate

import default  # noqa: E402

from zf_tf import ablate  # noqa: E402


def get_config(variant: str = "baseline"):
    return ablate.set_variant(default.get_config(), variant)
