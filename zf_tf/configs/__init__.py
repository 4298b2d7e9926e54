"""Experiment configs: one `get_config()` module each (ml_collections), e.g.
`from configs import default`. Configs are data: they import no library code."""
