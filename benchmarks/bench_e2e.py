"""What a user sees: ``hf-sae train`` seconds per step from stored activations and from a live LM, by the
difference of two runs (startup, initialisation, final checkpoint and export cancel), beside a bare LM
forward. Used by ``bench_train_step.py --e2e`` (the one command of issue 20's table); also runnable alone.

Run:  PYTHONPATH=. python benchmarks/bench_e2e.py [--n 32768 --k 32 --batch 4096 --d 768 --steps 4 14
      --threads 2 --live --rounds 3]

* ``cache``: ``hf-sae train`` (a subprocess, as a user runs it) on a ``.safetensors`` file of N(0, 1)
  activations [steps x batch, d] for S1 and S2 steps; seconds per step = (t(S2) - t(S1)) / (S2 - S1), in
  wall seconds and in the subprocess's CPU seconds; tokens/s = batch / that. Beside it, in this process,
  the bound (one B x d x n addmm + top-k) before and after each round, so "train / bound" is a ratio
  from one run (``--rounds``: median of that many pairs).
* ``live`` (``--live``): the same through the live path (the embedded SmolLM2-135M, d = 576, hook
  ``layers.6.resid_post``, the embedded corpus; the LM forward stops after the hooked block; no shuffle
  buffer, so that each step harvests its own tokens and the difference counts them), and a
  bare forward of the whole LM on ``batch`` tokens in this process (``lm_batch_size x context_length``
  windows, as the live source feeds them), minimum of 2 calls.

No evaluation, no intermediate checkpoints, no tracker, fp32.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

LIVE_HOOK = "layers.6.resid_post"


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_cli(steps: int, common: list[str], batch: int, out: str, threads: int) -> tuple[float, float]:
    """(wall s, CPU s) of one ``hf-sae train`` run of ``steps`` optimizer steps."""
    cmd = [sys.executable, "-m", "hf_sae.cli", "train", *common, "--batch_size", str(batch),
           "--train_tokens", str(steps * batch), "--output_dir", out, "--overwrite_output_dir", "true",
           "--eval_tokens", "0", "--eval_every_tokens", "0", "--checkpoint_every_tokens", "0",
           "--log_with", "none", "--progress_bar", "false", "--plot_report", "false", "--mixed_precision", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    c, t = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - t, _child_cpu() - c
    if proc.returncode != 0:
        raise RuntimeError(f"hf-sae train failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return wall, cpu


def per_step(common: list[str], steps: tuple[int, int], batch: int, threads: int, workdir: str) -> dict:
    """Seconds per step (wall and CPU) from the two step counts, each run once, the longer one first."""
    s1, s2 = sorted(steps)
    if s2 <= s1:
        raise ValueError(f"--steps needs two different step counts, got {steps}")
    runs = {s: train_cli(s, common, batch, os.path.join(workdir, f"run{s}"), threads) for s in (s2, s1)}
    (w1, c1), (w2, c2) = runs[s1], runs[s2]
    wall, cpu = (w2 - w1) / (s2 - s1), (c2 - c1) / (s2 - s1)
    return dict(wall=wall, cpu=cpu, tokens_per_s=batch / wall, startup=w1 - s1 * wall, runs=runs)


def write_activations(path: str, rows: int, d: int, seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"activations": torch.randn(rows, d, generator=g)}, path)


def bare_lm_forward(batch: int, context_length: int = 256, threads: int = 2, repeats: int = 2) -> tuple[float, float]:
    """(wall s, CPU s), minimum of ``repeats``, of the embedded LM's whole forward on ``batch`` tokens in
    windows of ``context_length``, ``lm_batch_size`` = 8 windows per call (the live source's defaults)."""
    from hf_sae.data.models import load_default_model

    torch.set_num_threads(threads)
    model, _ = load_default_model()
    windows = max(1, batch // context_length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (windows, context_length), generator=g)
    best = (float("inf"), float("inf"))
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first call warms up
            c, t = time.process_time(), time.perf_counter()
            for chunk in ids.split(8):
                model(chunk)
            best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def bound(n: int, k: int, batch: int, d: int, threads: int, repeats: int = 5) -> tuple[float, float, float]:
    """(wall s, CPU s, wall s into a kept output), minimum of ``repeats``, of the bound in this process: one
    B x d x n encoder addmm with the bias and the top-k (as ``bench_train_step.py``'s ``bound``), fp32,
    ``threads`` threads; the third figure writes the addmm into one [B, n] tensor allocated once (as the
    trainer's step does), the stricter bound."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    x, W, b = (torch.randn(batch, d, generator=g), torch.randn(n, d, generator=g) / d ** 0.5,
               torch.zeros(n))
    out = torch.empty(batch, n)
    best, kept = (float("inf"), float("inf")), float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        c, t = time.process_time(), time.perf_counter()
        torch.addmm(b, x, W.t()).topk(k, dim=-1, sorted=False)
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
        t = time.perf_counter()
        torch.addmm(b, x, W.t(), out=out).topk(k, dim=-1, sorted=False)
        kept = min(kept, time.perf_counter() - t)
    return best + (kept,)


def run(n: int, k: int, batch: int, d: int, steps: tuple[int, int], threads: int, live: bool,
        rounds: int = 1) -> dict:
    """{'cache': per-step dict, 'live': per-step dict + 'lm' (bare forward wall, CPU)} (live when asked).
    With ``rounds`` > 1 the cache path is measured that many times (each a pair of runs), its median kept
    (``all`` holds every round's wall s/step), and the bound measured beside it (``bound``: wall s, CPU s)."""
    import statistics

    workdir = tempfile.mkdtemp(prefix="bench_e2e_")
    try:
        path = os.path.join(workdir, "acts.safetensors")
        write_activations(path, max(steps) * batch, d)
        sae = ["--n_latents", str(n), "--k", str(k), "--init_tokens", str(batch)]
        cache = ["--activations", path, "--hook_points", "acts", *sae]
        per_round, bounds = [], []
        for _ in range(max(1, rounds)):
            bounds.append(bound(n, k, batch, d, threads))
            per_round.append(per_step(cache, steps, batch, threads, workdir))
        bounds.append(bound(n, k, batch, d, threads))
        mid = sorted(per_round, key=lambda r: r["wall"])[(len(per_round) - 1) // 2]
        best = tuple(min(b[i] for b in bounds) for i in range(3))
        out = {"cache": {**mid, "all": [r["wall"] for r in per_round],
                         "all_cpu": [r["cpu"] for r in per_round], "bound": best}}
        if rounds > 1:
            out["cache"]["cpu"] = statistics.median(out["cache"]["all_cpu"])
        if live:
            # no shuffle buffer: with the default one (65,536 tokens) both runs harvest the whole buffer
            # before their first step, and the difference of the two runs would miss the LM's cost
            live = ["--hook_points", LIVE_HOOK, "--shuffle_buffer_tokens", "0", *sae]
            out["live"] = per_step(live, steps, batch, threads, workdir)
            out["live"]["lm"] = bare_lm_forward(batch, threads=threads)
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_rows(res: dict, n: int, k: int, batch: int, d: int, steps, step_bench: float | None = None) -> None:
    """The end-to-end table (markdown); ``step_bench``: the step benchmark's time of our step (same n, k,
    no dead latents), for the ratio."""
    nan = float("nan")
    print(f"# hf-sae train, seconds per step = (t({max(steps)} steps) - t({min(steps)} steps)) / "
          f"{max(steps) - min(steps)}; batch {batch} tokens, n = {n}, k = {k}")
    head = ("| path | d | s/step wall | CPU s/step | tokens/s | startup + end s | step benchmark s "
            "| train / benchmark | bare LM forward s (CPU s) | train / bare LM |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, r in res.items():
        if name == "cache" and r.get("bound"):
            bw, bc, bk = r["bound"]
            print(f"# bound in the same run (addmm + top-k, min of 5 calls x {len(r['all']) + 1} times): "
                  f"{bw:.3f} s wall, {bc:.3f} CPU s; train / bound = {r['wall'] / bw:.3f} wall (rounds: "
                  + ", ".join(f"{w / bw:.3f}" for w in r["all"]) + f"), {r['cpu'] / bc:.3f} CPU; "
                  f"into a kept output {bk:.3f} s wall, train / that = {r['wall'] / bk:.3f}")
        lm = r.get("lm")
        bench = step_bench if name == "cache" and step_bench else nan
        lm_cols = f"{lm[0]:.3f} ({lm[1]:.3f}) | {r['wall'] / lm[0]:.2f}" if lm else "- | -"
        print(f"| {name} | {d if name == 'cache' else 576} | {r['wall']:.3f} | {r['cpu']:.3f} "
              f"| {r['tokens_per_s']:.0f} | {r['startup']:.1f} | {bench:.3f} | {r['wall'] / bench:.2f} | {lm_cols} |")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, nargs=2, default=[4, 14], help="the two step counts of hf-sae train")
    ap.add_argument("--live", action="store_true",
                    help="also the live path (embedded SmolLM2-135M) and a bare LM forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the cache path this many times (pairs of runs), report the median")
    add_args(ap)
    a = ap.parse_args()
    res = run(a.n, a.k, a.batch, a.d, tuple(a.steps), a.threads, a.live, rounds=a.rounds)
    print_rows(res, a.n, a.k, a.batch, a.d, a.steps)


if __name__ == "__main__":
    main()
