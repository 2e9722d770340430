#!/usr/bin/env python
"""Train sparse autoencoders on LM activations (one SAE per hook point).

Runs the same under every launcher:

    python scripts/train.py --hook_points layers.6.resid_post --train_tokens 2000000
    accelerate launch scripts/train.py run.yaml
    torchrun --nproc_per_node 2 scripts/train.py --config run.yaml     # 2 processes (GPUs, or gloo on CPUs)
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py run.yaml   # the same

A launch that would not run the processes it asks for (``accelerate launch --num_processes 2`` without
``--multi_gpu`` on CPUs starts one) stops before any work and prints the command that works. Errors are
one line; ``--debug`` shows the traceback.

`--resume` continues from the newest valid checkpoint in --output_dir. See `--help` for every argument.
"""
import sys

from hf_sae.training.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main(sys.argv[1:]))
