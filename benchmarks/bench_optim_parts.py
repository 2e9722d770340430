"""The pieces of the optimizer side of a training step, one [n, d] fp32 table each, on CPU: the unfused
and fused Adam updates (whole and in row blocks), and the decoder-gradient projection with an [n, d]
temporary and in row blocks through one reused buffer (``hf_sae.modeling_sae.row_blocks``).

Run:  PYTHONPATH=. python benchmarks/bench_optim_parts.py [--n 32768 --d 768 --threads 2 --repeats 7]

Prints the minimum wall seconds and process CPU seconds over ``--repeats`` calls (after one warm-up call) of each piece.
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_sae.modeling_sae
from hf_sae.modeling_sae import remove_parallel_rows_, row_blocks


def best(fn, repeats: int) -> tuple[float, float]:
    """(min wall s, min CPU s) over ``repeats`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def blocked(fn, *tables):
    """fn applied to every row block of the tables (the blocks of ``row_blocks``)."""
    def go():
        for rows in row_blocks(tables[0]):
            fn(*(t[rows] for t in tables))
    return go


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
    buf = torch.empty_like(g[row_blocks(g)[0]])
    rows = {
        "row dots (g * w).sum(-1)  [n, d] temporary": lambda: (g * w).sum(-1),
        "projection remove_parallel_rows_, whole table ([n, d] temporary)": lambda: remove_parallel_rows_(g, w),
        "projection remove_parallel_rows_, row blocks, one buffer": blocked(
            lambda gb, wb: remove_parallel_rows_(gb, wb, buf[:gb.shape[0]]), g, w),
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
    m, v, step = torch.zeros(n, d), torch.zeros(n, d), torch.ones(())

    def fused(p, g, m, v):
        torch._fused_adam_([p], [g], [m], [v], [], [step], amsgrad=False, lr=1e-9, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, maximize=False)
    rows["fused Adam kernel, row blocks"] = blocked(fused, w, g, m, v)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, one [{n}, {d}] fp32 table; "
          f"min of {r} calls; row blocks of {hf_sae.modeling_sae.ROW_BLOCK_BYTES >> 10} KB")
    print("| piece | wall s | CPU s |\n|---|---|---|")
    for name, fn in rows.items():
        wall, cpu = best(fn, r)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |", flush=True)


if __name__ == "__main__":
    main()
