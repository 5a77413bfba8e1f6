#!/usr/bin/env python
"""RLHF fine-tuning: `python train_rlhf.py --config ... --rlhf_config configs/rlhf/test_cpu.yaml`.

This version validates the whole stack (including the `rlhf:` section) and
prints it; the RLHF trainer is not part of this version.
"""

import sys

from ava.cli.main import train_entry

if __name__ == "__main__":
    if "--rlhf_config" not in " ".join(sys.argv):
        print("train_rlhf.py: --rlhf_config is required, e.g. --rlhf_config configs/rlhf/test_cpu.yaml",
              file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(train_entry())
