"""Time `hf-sae dashboard` on the embedded SmolLM2-135M: wall time per stage, peak resident memory, site size.

    nice -n 19 python benchmarks/bench_dashboard.py --n-latents 32768 --n-tokens 200000 --out /tmp/bench_site

The SAE is a freshly initialised TopK SAE (k = 32) on ``layers.6.resid_post``, or ``--sae PATH``
(a trained one). Its latents fire more evenly than a trained SAE's, which is the harder case for the site
(no dead latents to skip: every latent has its full set of contexts). The baseline measured in the same run
is the LM forward over the same tokens (``of_which_lm_forward``): the cost any tool that reads activations
pays. Writes ``--out``/build_info.json and prints one JSON line; record results in
``benchmarks/RESULTS_dashboard.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-latents", type=int, default=32768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-tokens", type=int, default=200_000)
    p.add_argument("--split", default="train", help="KJV split (validation has only ~36k tokens; default train)")
    p.add_argument("--sae", default=None, help="a trained SAE folder instead of a fresh one")
    p.add_argument("--n2g-latents", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--out", default="/tmp/hf_sae_bench_dashboard")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run under cProfile and print the N functions with the most own time (CPU clock)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from hf_sae import SAEConfig, SparseAutoencoder
    from hf_sae.dashboard import build_dashboard
    from hf_sae.data.models import DEFAULT_MODEL, load_model

    model, tok = load_model(DEFAULT_MODEL)
    if args.sae:
        sae = SparseAutoencoder.from_pretrained(args.sae)
    else:
        torch.manual_seed(0)
        sae = SparseAutoencoder(
            SAEConfig(
                d_in=576, n_latents=args.n_latents, k=args.k, hook_point="layers.6.resid_post", base_model=DEFAULT_MODEL
            )
        )
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    t = time.perf_counter()
    info = build_dashboard(
        sae.eval(),
        args.out,
        model=model,
        tokenizer=tok,
        n_tokens=args.n_tokens,
        split=args.split,
        batch_size=args.batch_size,
        n2g_latents=args.n2g_latents,
        progress=True,
    )
    wall = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    info.update(
        wall_s=round(wall, 1),
        n_latents=sae.config.n_latents,
        torch_threads=torch.get_num_threads(),
        load_average_1min=round(os.getloadavg()[0], 2),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
