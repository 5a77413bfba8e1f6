"""Command-line interface: `ava`, `python train.py` and `deepspeed train.py` share these parsers."""
