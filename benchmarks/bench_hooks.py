"""Speed of hf_sae.hooks on SmolLM2-135M (CPU, fp32): what stop-early saves, what hooks cost.

Run:  PYTHONPATH=. python benchmarks/bench_hooks.py [--batch 4 --seq 64 --repeats 5]
Prints a table of median wall times and their ratio to a plain forward.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_sae.data.models import load_default_model
from hf_sae.hooks import list_hook_points, model_parts, resolve_hook_point, run_with_capture, splice


def _interleaved_medians(cases: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each case, the cases run round-robin so that load drift hits all alike."""
    for fn in cases.values():
        fn()  # warm-up
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_default_model()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    all_points = list_hook_points(model)

    cases = {
        "plain forward (use_cache=False)": lambda: model(ids, use_cache=False),
        "capture layers.6.resid_post, stop_early": lambda: run_with_capture(model, ids, ["layers.6.resid_post"]),
        "capture layers.6.resid_post, full forward": lambda: run_with_capture(
            model, ids, ["layers.6.resid_post"], stop_early=False),
        "capture layers.0.resid_post, stop_early": lambda: run_with_capture(model, ids, ["layers.0.resid_post"]),
        f"capture all {len(all_points)} hook points": lambda: run_with_capture(model, ids, all_points,
                                                                               stop_early=False),
        "splice identity (clone) at layers.6.resid_post": lambda: _splice_forward(model, ids),
    }
    with torch.no_grad():
        med = _interleaved_medians(cases, args.repeats)
    base = med["plain forward (use_cache=False)"]
    rows = [(name, t, t / base) for name, t in med.items()]
    small = _interleaved_medians({"parts": lambda: model_parts(model),
                                  "resolve": lambda: resolve_hook_point(model, "layers.6.resid_post")}, 20)
    t_parts, t_resolve = small["parts"], small["resolve"]

    print(f"SmolLM2-135M fp32 CPU, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq} tokens, "
          f"median of {args.repeats}")
    print(f"| {'case':<48} | {'ms':>8} | {'ratio to plain':>14} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 16}|")
    for name, t, r in rows:
        print(f"| {name:<48} | {t * 1e3:8.1f} | {r:14.2f} |")
    print(f"model_parts(): {t_parts * 1e3:.2f} ms; resolve_hook_point(): {t_resolve * 1e3:.2f} ms")


def _splice_forward(model, ids):
    with splice(model, {"layers.6.resid_post": lambda x: x.clone()}):
        return model(ids, use_cache=False)


if __name__ == "__main__":
    main()
