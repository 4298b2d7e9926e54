"""The contract of every analysis in `analyses.REGISTRY`, on the trained default model: it
runs from a request as the command line makes it, computes and renders every file its
`outputs` names (PNGs decode, npz files load), refuses to run again over them without
--overwrite and refuses a split the data does not have, writing nothing either time."""

import copy
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_analysis
from zf_tf import analyses
from zf_tf.analyses import base
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import DataError

# Each analysis made small: its config.analysis.<name> fields.
SMALL = {
    "deconv": {"layer": "conv2", "num_features": 2, "top_k": 2},
    "occlusion": {"num_images": 1, "size": 0.5, "stride": 0.5},
    "invariance": {
        "num_images": 1,
        "translations": (0.0, 0.1),
        "scales": (1.0, 1.2),
        "rotations": (0, 90),
    },
    "correspondence": {"num_images": 2, "random_draws": 1},
    "evolution": {},
    "filters": {"layer2_features": 2},
    "attribution": {"num_images": 1, "pointing_images": 2, "methods": ("saliency", "gradcam")},
    "atlas": {"layers": ("conv1",), "top_k": 2},
    "sanity": {"num_images": 2, "methods": ("saliency",), "steps": 2, "projection_units": 1},
    "featvis": {"steps": 2, "color_images": 0, "layer": "conv1", "num_features": 2},
}
# evolution reads the training's snapshots, featvis (color_images=0) no images at all
READS_A_SPLIT = set(SMALL) - {"evolution", "featvis"}


def test_every_registered_analysis_is_covered():
    assert sorted(SMALL) == sorted(analyses.REGISTRY)


def _tree(path):
    return sorted(
        (os.path.relpath(os.path.join(root, f), path), os.stat(os.path.join(root, f)).st_mtime_ns)
        for root, _, files in os.walk(path)
        for f in files
    )


@pytest.mark.slow  # 10 analyses, 1-15 s each
@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_analysis_computes_renders_and_refuses_without_writing(name, trained_default, tmp_path):
    config, original = trained_default
    config = copy.deepcopy(config)
    workdir = str(shutil.copytree(original, tmp_path / "w"))
    for key, value in SMALL[name].items():
        config.analysis[name][key] = value
    analysis = analyses.get(name)
    out = run_analysis(name, config, workdir)
    assert out.paths, "wrote nothing"
    settings = analysis.resolve(
        analysis.settings(config, base.Request(workdir=workdir)),
        base.load_model(config, base.Request(workdir=workdir)),
        None,
    )
    folder, names = analysis.outputs(settings)
    assert sorted(out.paths) == sorted(names)
    for path in out.paths.values():
        assert path.startswith(os.path.join(workdir, folder)) and os.path.getsize(path) > 0
        if path.endswith(".png"):
            with Image.open(path) as im:
                assert min(im.size) > 8 and np.asarray(im).std() > 0
        elif path.endswith(".npz"):
            with np.load(path) as f:
                assert f.files
    before = _tree(workdir)
    with pytest.raises(UsageError, match="--overwrite"):
        run_analysis(name, config, workdir)
    if name in READS_A_SPLIT:
        with pytest.raises((UsageError, DataError), match="nope"):
            run_analysis(name, config, workdir, split="nope", overwrite=True)
    assert _tree(workdir) == before
