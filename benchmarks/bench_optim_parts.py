"""The pieces of the optimizer side of a training step, one [n, d] fp32 table each, on CPU: the unfused
and fused Adam updates, and the decoder-gradient projection with and without [n, d] temporaries.

Run:  PYTHONPATH=. python benchmarks/bench_optim_parts.py [--n 32768 --d 768 --threads 2 --repeats 7]

Prints the minimum wall seconds over ``--repeats`` calls (after one warm-up call) of each piece.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_sae.modeling_sae import _row_dots


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, d, r = args.n, args.d, args.repeats
    g, w = torch.randn(n, d), torch.randn(n, d)
    coef = torch.randn(n, 1) * 1e-9
    rows = {
        "row dots (g * w).sum(-1)  [n, d] temporary": lambda: (g * w).sum(-1),
        "row dots _row_dots(g, w)  32 MB blocks": lambda: _row_dots(g, w),
        "projection g.sub_(coef * w)": lambda: g.sub_(coef * w),
        "projection g.addcmul_(coef, w, value=-1)": lambda: g.addcmul_(coef, w, value=-1),
        "global norm vector_norm(g)": lambda: torch.linalg.vector_norm(g),
        "row renorm w.div_(row norms)": lambda: w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12)),
    }
    for fused, foreach in ((False, False), (False, True), (True, None)):
        p = torch.nn.Parameter(torch.randn(n, d))
        p.grad = g
        opt = torch.optim.Adam([p], lr=1e-9, foreach=foreach, fused=fused)
        name = "fused" if fused else ("foreach" if foreach else "single-tensor")
        rows[f"torch.optim.Adam {name} step"] = opt.step
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, one [{n}, {d}] fp32 table; "
          f"min wall s of {r} calls")
    print("| piece | s |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {best(fn, r):.3f} |", flush=True)


if __name__ == "__main__":
    main()
