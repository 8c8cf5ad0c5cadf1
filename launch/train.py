"""Training entry point for launchers:  deepspeed launch/train.py --config configs/X.yaml [--set k=v ...]
(also torchrun launch/train.py ..., or python launch/train.py ... for one process). The logic is lctrain.train."""
import sys

from lctrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
