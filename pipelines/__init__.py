"""Input pipelines: robust decode, the 10-crop geometry, sources (tfds by name, image
folders, the embedded tfds builder). Pure functions of (config.data, split); never imports
zf_tf."""


class DataError(ValueError):
    """The data a config names cannot be read as asked (unknown split, bad folder).

    The command line prints it as one line, like zf_tf's UsageError.
    """
