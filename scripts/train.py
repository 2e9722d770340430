#!/usr/bin/env python
"""Train sparse autoencoders on LM activations (one SAE per hook point).

Runs the same under every launcher:

    python scripts/train.py --hook_points layers.6.resid_post --train_tokens 2000000
    accelerate launch scripts/train.py run.yaml
    torchrun --nproc_per_node 2 scripts/train.py --config run.yaml     # GPUs
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 scripts/train.py ...   # 2 CPU processes (gloo)

`--resume` continues from the newest valid checkpoint in --output_dir. See `--help` for every argument.
"""
import sys

from hf_sae.training.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main(sys.argv[1:]))
