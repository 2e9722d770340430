"""Profile one fused TopK training step on CUDA (torch.profiler): where the time goes per kernel/op.

Run on a GPU machine:  PYTHONPATH=. python benchmarks/profile_step_cuda.py [--n 32768 --k 32 --dead 0.25 --dtype bf16]
Prints the ops by total CUDA time and by CPU time (launch overhead and host syncs show up there).
"""

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from hf_sae import SAEConfig, SparseAutoencoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dead", type=float, default=0.25)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--kernel", default="triton")
    ap.add_argument("--mode", default="atomic", choices=["sorted", "atomic"])
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    os.environ["HF_SAE_TRITON_TABLE_GRAD"] = a.mode
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d, device=dev, dtype=dtype)
    dead = torch.zeros(a.n, dtype=torch.bool, device=dev)
    dead[torch.randperm(a.n, device=dev)[: int(a.dead * a.n)]] = True
    sae = SparseAutoencoder(SAEConfig(d_in=a.d, n_latents=a.n, k=a.k, kernel=a.kernel)).to(dev, dtype)

    def step():
        for p in sae.parameters():
            p.grad = None
        sae(x, dead_mask=dead if a.dead > 0 else None).loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"# n={a.n} k={a.k} dead={a.dead} {a.dtype} kernel={a.kernel} mode={a.mode}, 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
