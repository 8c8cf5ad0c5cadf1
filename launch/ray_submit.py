"""Submit a training run to a Ray cluster:  python launch/ray_submit.py --address http://HEAD:8265 --config
configs/X.yaml [--set k=v ...] [--num-workers N --gpus-per-worker G ...]  (the same as `lctrain submit ...`).
The logic is lctrain.ray."""
import sys

from lctrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
