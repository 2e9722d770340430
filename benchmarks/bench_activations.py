"""Benchmark: activation harvesting and cached reading.

(a) harvest: ``cache_activations`` (forward up to the deepest hook point, masking, fp16 cast,
    statistics, Arrow shards with checksums) against a bare forward of the same truncated
    model (``model.model`` with only the blocks up to that layer), in LM tokens per second.
    Goal: >= 0.9x.
(b) read: shuffled batches from ``CachedActivations`` against
    ``datasets.load_from_disk(...).with_format("torch")`` (shuffled, and in order as its best
    case), in rows per second, on a 768-d fp16 synthetic cache. Goal: >= 5x and >= 1M rows/s.

Usage::

    python benchmarks/bench_activations.py                 # SmolLM2 + 1M-row read benchmark
    python benchmarks/bench_activations.py --quick         # smaller sizes (smoke run)

Timings are best-of-``--repeats`` wall clock on the current machine (noisy on shared CPUs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn):
    """(wall seconds, process CPU seconds of all threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_harvest(args, tmp: Path) -> list[tuple[str, float, str]]:
    from hf_sae.data import cache_activations, load_default_model, load_texts, tokenize_windows
    from hf_sae.hooks import parse_hook_point

    model, tok = load_default_model()
    windows = tokenize_windows(load_texts("default"), tok, window=256, max_windows=args.windows)
    hooks = args.hook_points
    depth = max(parse_hook_point(h)[0] for h in hooks) + 1
    n_tok = windows.numel()
    B = args.batch_windows

    layers = model.model.layers

    def bare():
        model.model.layers = layers[:depth]
        try:
            with torch.no_grad():
                for i in range(0, len(windows), B):
                    model.model(input_ids=windows[i:i + B], use_cache=False)
        finally:
            model.model.layers = layers

    def harvest():
        out = tmp / "harvest"
        shutil.rmtree(out, ignore_errors=True)
        cache_activations(model, tok, windows, hooks, out, max_tokens=None, dtype="float16",
                          batch_windows=B, shard_tokens=1 << 14, progress=False)

    bare()  # warm-up
    t_bare, t_harv = [], []
    for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
        t_bare.append(_timed(bare))
        t_harv.append(_timed(harvest))
    tb, th = min(t[0] for t in t_bare), min(t[0] for t in t_harv)
    cb, ch = min(t[1] for t in t_bare), min(t[1] for t in t_harv)
    note = f"SmolLM2-135M, {len(windows)} windows x 256, blocks 0..{depth - 1}, batch {B}, hooks {','.join(hooks)}"
    return [("bare forward of truncated model (LM tok/s, wall)", n_tok / tb, note),
            ("cache_activations, fp16 shards (LM tok/s, wall)", n_tok / th, f"ratio {tb / th:.2f}x (goal >= 0.9x)"),
            ("bare forward of truncated model (LM tok per CPU-s)", n_tok / cb, "process CPU time, all threads"),
            ("cache_activations, fp16 shards (LM tok per CPU-s)", n_tok / ch,
             f"ratio {cb / ch:.2f}x (CPU time: robust to other jobs on the machine)")]


def bench_read(args, tmp: Path) -> list[tuple[str, float, str]]:
    import datasets

    from hf_sae.data import CachedActivations, write_activations

    N, d, B = args.rows, 768, args.batch_size
    path = tmp / "read"
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(min(1 << 16, N - i), d, generator=g).half() for i in range(0, N, 1 << 16)]
    write_activations(path, {"layers.6.resid_post": torch.cat(chunks)}, dtype="float16", shard_tokens=1 << 16)
    del chunks
    rows = []

    def ours(dtype, epochs, verify=True):
        r = CachedActivations(path, batch_size=B, dtype=dtype, verify=verify)
        n = 0
        t = time.perf_counter()
        for e in range(epochs):
            r.set_epoch(e)
            for b in r:
                n += b.shape[0]
        return n / (time.perf_counter() - t)

    cold = ours(torch.float32, 1)  # first epoch: sha256 of every shard is verified
    warm32 = max(ours(torch.float32, 1, verify=False) for _ in range(args.repeats))
    warm16 = max(ours(None, 1, verify=False) for _ in range(args.repeats))

    ds = datasets.load_from_disk(str(path / "layers.6.resid_post")).with_format("torch")
    n_base = min(N, args.baseline_rows)

    def base_shuffled():
        s = ds.shuffle(seed=0)
        t = time.perf_counter()
        n = 0
        for i in range(0, n_base, B):
            n += s[i:i + B]["activation"].float().shape[0]
        return n / (time.perf_counter() - t)

    def base_ordered():
        t = time.perf_counter()
        n = 0
        for i in range(0, n_base, B):
            n += ds[i:i + B]["activation"].float().shape[0]
        return n / (time.perf_counter() - t)

    bs = max(base_shuffled() for _ in range(args.repeats))
    bo = max(base_ordered() for _ in range(args.repeats))
    note = f"{N} rows x {d} fp16, batch {B}, {len(CachedActivations(path).shard_rows)} shards"
    rows += [
        ("datasets load_from_disk .with_format('torch'), shuffled (rows/s)", bs, f"first {n_base} rows; {note}"),
        ("datasets load_from_disk .with_format('torch'), in order (rows/s)", bo, "its best case"),
        (
            "CachedActivations shuffled -> fp32, epoch 1 incl. sha256 (rows/s)",
            cold,
            f"{cold / bs:.1f}x shuffled baseline",
        ),
        (
            "CachedActivations shuffled -> fp32 (rows/s)",
            warm32,
            f"{warm32 / bs:.1f}x shuffled baseline, {warm32 / bo:.1f}x in-order (goal >= 5x, >= 1M rows/s)",
        ),
        ("CachedActivations shuffled -> fp16 (rows/s)", warm16, f"{warm16 / bs:.1f}x shuffled baseline"),
    ]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--windows", type=int, default=64, help="256-token windows for the harvest benchmark")
    p.add_argument("--hook-points", nargs="+", default=["layers.6.resid_post", "layers.6.mlp_out"])
    p.add_argument("--batch-windows", type=int, default=8)
    p.add_argument("--rows", type=int, default=1 << 20, help="rows of the read benchmark cache")
    p.add_argument("--baseline-rows", type=int, default=1 << 17, help="rows the (slow) baseline reads")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-harvest", action="store_true")
    p.add_argument("--skip-read", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.rows, args.baseline_rows, args.repeats = 16, 1 << 17, 1 << 15, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_act_") as tmp:
        if not args.skip_harvest:
            rows += bench_harvest(args, Path(tmp))
        if not args.skip_read:
            rows += bench_read(args, Path(tmp))
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"| {'measurement':<68} | {'value':>12} | notes |")
    print(f"|{'-' * 70}|{'-' * 14}|-------|")
    for name, v, note in rows:
        print(f"| {name:<68} | {v:>12,.0f} | {note} |")


if __name__ == "__main__":
    main()
