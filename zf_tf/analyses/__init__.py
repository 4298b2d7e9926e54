"""Analyses: one module per analysis, each a compute function (model + examples + typed
settings -> arrays, no files, no flags) and a render function, run by `base.run`."""

from __future__ import annotations

import importlib

# --mode name -> the module defining its `ANALYSIS` (zf_tf/analyses/base.py).
REGISTRY = {
    "deconv": "zf_tf.analyses.deconv",
    "occlusion": "zf_tf.analyses.occlusion",
    "invariance": "zf_tf.analyses.invariance",
    "correspondence": "zf_tf.analyses.correspondence",
    "evolution": "zf_tf.analyses.evolution",
    "filters": "zf_tf.analyses.filters",
    "attribution": "zf_tf.analyses.attribution",
    "atlas": "zf_tf.analyses.atlas",
    "sanity": "zf_tf.analyses.sanity",
    "featvis": "zf_tf.analyses.featvis",
}


def get(name: str):
    """The `Analysis` of mode `name` (its module is imported on first use)."""
    return importlib.import_module(REGISTRY[name]).ANALYSIS
