"""zf-tf: ZFNet (Zeiler & Fergus 2014) in TensorFlow/Keras, and tools to see inside it.

The package is layered; each layer imports only from the layers below it (checked by
import-linter, `make lint`; see BUILD.md):

  cli          flags -> typed settings -> one dispatch; library errors -> one line
  experiments  ablate (Table 3), transfer (Tables 4-6, Fig. 9)
  analyses     one module per analysis (compute -> arrays, render -> figures), one runner
  training     strategies, train, evaluate, export, callbacks, the workdir
  outputs      where outputs go, the overwrite policy, figures, arrays, TensorBoard images
  core         the model, the deconvnet, receptive fields, the streaming top-k; no files
"""
