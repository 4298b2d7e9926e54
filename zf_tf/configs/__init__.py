"""Experiment configs: one `get_config()` module each (ml_collections), e.g.
`from zf_tf.configs import default`; `--config=configs/x.py` names them from any directory.
Configs are data: they import no library code."""
