"""zf-tf: ZFNet (Zeiler & Fergus 2014) in TensorFlow/Keras, and tools to see inside it.

The package is layered; each layer imports only from the layers below it (checked by
import-linter, `make lint`; see BUILD.md):

  cli          flags -> typed settings -> one dispatch; library errors -> one line
  experiments  ablate (Table 3), transfer (Tables 4-6, Fig. 9)
  analyses     one module per analysis (compute -> arrays, render -> figures), one runner
  training     strategies, train, evaluate, export, callbacks, the workdir
  outputs      where outputs go, the overwrite policy, figures, arrays, TensorBoard images
  core         the model, the deconvnet, receptive fields, the streaming top-k; no files

From Python (a notebook), on any in-memory Keras convnet (`zf_tf.api`):

    import zf_tf
    zf_tf.projections(model, images, "conv4", units=[0, 5])  # deconvnet projections
    zf_tf.top_k(model, images, ["conv1", "conv5"], k=9)      # strongest images per unit
    zf_tf.attribution(model, images, classes, "gradcam")     # any of zf_tf.METHODS
    zf_tf.occlusion(model, images, classes)                  # Fig. 7 maps
    zf_tf.sanity(model, images, classes)                     # randomization checks
    zf_tf.atlas(model, images, "atlas/")                     # a web site of every unit
    zf_tf.featvis(model, "conv5", units=[0, 1])              # each unit's optimized image
"""

from zf_tf.core.errors import UsageError

_API = (
    "METHODS",
    "atlas",
    "attribution",
    "featvis",
    "occlusion",
    "projections",
    "sanity",
    "top_k",
)
__all__ = ["UsageError", *_API]


def __getattr__(name: str):
    """The API's names, imported on first use: `import zf_tf` itself starts no TensorFlow
    (main.py installs its signal handling before TensorFlow starts any thread)."""
    if name in _API:
        from zf_tf import api

        return getattr(api, name)
    raise AttributeError(f"module 'zf_tf' has no attribute {name!r}")
