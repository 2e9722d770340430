"""Latent-sharded SAE training (hf_sae.parallel) against the number of shards P: per-rank memory, step
time, communication per step (measured by the collectives' byte counters against the analytic count).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sharded.py --n 65536 --d 256 --k 32 --batch 1024 --tp 1 2 4
    PYTHONPATH=. .venv/bin/python benchmarks/bench_sharded.py --table      # the memory model's table only

P processes on this machine (gloo on CPU; NCCL when there are >= P GPUs), TP only (one DP replica): each
rank holds n/P latents. Per-rank memory: the training state measured from the tensors (params, grads,
Adam moments, counters) and the peak resident-set increase over the process's size before the SAE was
built (CUDA: peak allocated), both beside hf_sae.parallel.memory's model. Writes JSON + a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def analytic_comm_bytes(N: int, d: int, k: int, P: int) -> int:
    """Bytes one rank contributes to the collectives of one topk step (no dead latent, one DP replica):
    candidates (k values fp32 + k ids int64 per token), the partial reconstruction (N x d fp32), the
    encoder input's gradient in backward (N x d), the selected values and their decoder-norm weights
    (2 x N x k), the per-token L0 (N float64), and two scalars (dead count, gradient norm)."""
    if P == 1:
        return 0
    return N * k * (4 + 8) + 2 * N * d * 4 + 2 * N * k * 4 + N * 8 + 2 * 8


def _worker(rank, cfg, out_dir):
    from hf_sae import SAEConfig
    from hf_sae.parallel import ShardedSAE, make_mesh, sharded_adam, train_step
    from hf_sae.parallel.mesh import COMM_BYTES

    P, n, d, k, B = cfg["P"], cfg["n"], cfg["d"], cfg["k"], cfg["batch"]
    dev = torch.device("cuda", rank) if cfg["cuda"] else torch.device("cpu")
    mesh = make_mesh(P)
    rss0 = _rss_bytes()
    if cfg["cuda"]:
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    config = SAEConfig(d_in=d, n_latents=n, k=k, dead_tokens_threshold=10 ** 12, kernel="torch")
    with torch.device(dev):
        model = ShardedSAE(config, mesh)
        g = torch.Generator(device=dev).manual_seed(1000 + rank)
        with torch.no_grad():  # this rank's rows of the tied init, without materializing the whole SAE
            model.W_dec.copy_(torch.randn(model.n_local, d, generator=g, device=dev))
            model.normalize_decoder_()
            model.W_enc.copy_(model.W_dec)
    opt = sharded_adam(model, 1e-3)
    gx = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(B, d, generator=gx, device=dev)
    since = torch.zeros(model.n_local, dtype=torch.int64, device=dev)
    total = torch.zeros_like(since)
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"]:
            COMM_BYTES.clear()
        if cfg["cuda"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, since, _ = train_step(model, opt, x, since, batch_tokens=B)
        if cfg["cuda"]:
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors) + 2 * since.numel() * 8
    # grads are freed by zero_grad(set_to_none): count them as the params' size (they exist during the step)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not any(p.grad is not None for p in model.parameters()):
        state_bytes += grad_bytes
    res = {"rank": rank, "P": P, "state_bytes": state_bytes, "step_s": statistics.median(times),
           "comm_bytes_per_step": sum(COMM_BYTES.values()) / cfg["steps"],
           "comm_by_kind": {kk: v / cfg["steps"] for kk, v in COMM_BYTES.items()}}
    if cfg["cuda"]:
        res["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
    else:
        res["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    del total
    with open(os.path.join(out_dir, f"P{P}-rank{rank}.json"), "w") as f:
        json.dump(res, f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step (each TP rank sees all of them)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results_sharded")
    ap.add_argument("--table", action="store_true", help="print the memory model's table and exit")
    a = ap.parse_args(argv)
    from hf_sae.parallel import memory
    from hf_sae.parallel.mesh import launch_local

    if a.table:
        print(memory.table())
        return
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= max(a.tp)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for P in a.tp:
        if a.n % P:
            sys.exit(f"--n {a.n} is not divisible by P={P}; choose --n a multiple of every --tp value")
        cfg = dict(P=P, n=a.n, d=a.d, k=a.k, batch=a.batch, steps=a.steps, warmup=a.warmup, cuda=cuda)
        launch_local(_worker, P, args=(cfg, a.out), timeout=1800, backend="nccl" if cuda else "gloo")
        ranks = [json.load(open(os.path.join(a.out, f"P{P}-rank{r}.json"))) for r in range(P)]
        model_state = sum(memory.state_bytes_per_rank(a.n, a.d, P).values())
        model_total = memory.bytes_per_rank(a.n, a.d, P, batch_tokens_per_rank=a.batch)
        rows.append({"P": P, "state_MB": max(r["state_bytes"] for r in ranks) / 1e6,
                     "model_state_MB": model_state / 1e6,
                     "peak_MB": max(r["peak_bytes"] for r in ranks) / 1e6, "model_peak_MB": model_total / 1e6,
                     "step_s": max(r["step_s"] for r in ranks),
                     "comm_MB": max(r["comm_bytes_per_step"] for r in ranks) / 1e6,
                     "analytic_comm_MB": analytic_comm_bytes(a.batch, a.d, a.k, P) / 1e6})
    base = rows[0]
    print(f"n={a.n} d={a.d} k={a.k} batch={a.batch} tokens, {'NCCL/CUDA' if cuda else 'gloo/CPU'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| P | state MB / rank (measured) | model | x P / P=1 | peak MB / rank (measured) | model | "
          "step s | step / P=1 | comm MB / step / rank | analytic |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["state_ratio"] = r["state_MB"] * r["P"] / (base["state_MB"] * base["P"])
        print(f"| {r['P']} | {r['state_MB']:.1f} | {r['model_state_MB']:.1f} | {r['state_ratio']:.3f} | "
              f"{r['peak_MB']:.1f} | {r['model_peak_MB']:.1f} | {r['step_s']:.3f} | "
              f"{r['step_s'] / base['step_s']:.2f} | "
              f"{r['comm_MB']:.3f} | {r['analytic_comm_MB']:.3f} |")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({"args": vars(a), "cuda": cuda, "rows": rows}, f, indent=1)
    _plot(rows, a, os.path.join(a.out, "sharded_memory.png"))


def _plot(rows, a, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = [r["P"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(P, [r["state_MB"] for r in rows], "o-", label="training state (measured)")
    ax[0].plot(P, [r["model_state_MB"] for r in rows], "x--", label="memory model")
    ax[0].plot(P, [r["peak_MB"] for r in rows], "s-", label="peak increase (measured)")
    ax[0].plot(P, [rows[0]["state_MB"] / p for p in P], ":", c="gray", label="1/P")
    ax[0].set(xlabel="P (latent shards)", ylabel="MB per rank", xscale="log", yscale="log",
              title=f"n={a.n}, d={a.d}, batch {a.batch}")
    ax[0].legend(fontsize=8)
    ax[1].plot(P, [r["comm_MB"] for r in rows], "o-", label="measured")
    ax[1].plot(P, [r["analytic_comm_MB"] for r in rows], "x--", label="analytic")
    ax[1].set(xlabel="P", ylabel="MB sent per rank per step", title="communication")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
