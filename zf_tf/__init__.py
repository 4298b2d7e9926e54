"""zf-tf: ZFNet (Zeiler & Fergus 2014) in TensorFlow/Keras, and tools to see inside it."""


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
