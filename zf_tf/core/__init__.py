"""Core: the ZFNet model, the deconvnet (explicit Model and gradient-rule form), receptive
fields and the streaming top-k scan. Knows no files, no flags, no workdir."""
