#!/usr/bin/env python
"""Train an Ava model: `python train.py --config ...` or `deepspeed train.py --config ...`."""

from ava.cli.main import train_entry

if __name__ == "__main__":
    raise SystemExit(train_entry())
