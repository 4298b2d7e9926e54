"""Experiments that train models: the ablations (Table 3) and transfer (Tables 4-6, Fig. 9)."""
