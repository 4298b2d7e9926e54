"""zf-tf command line in a checkout: `python main.py --mode=MODE [--config=FILE] ...`, the
same as the `zf-tf` command of an installed package (zf_tf/__main__.py: the flags, the
quiet console, the signal handling)."""

from zf_tf.__main__ import run

if __name__ == "__main__":
    run()
