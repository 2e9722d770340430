"""Speed of one SAE training step on CPU: the trainer's whole step and its forward + backward against
the bound (one B x d x n encoder addmm + the top-k), a plain sparse torch step, sparsify's step (when
installed) and the dense-autograd path.

Run:  PYTHONPATH=. python benchmarks/bench_train_step.py [--batch 4096 --d 768 --n 16384 32768
      --k 32 128 --dead 0 0.25 --dead-kind realistic random --repeats 3 --dense-repeats 1 --threads 2
      --peers plain sparsify] [--e2e [--steps 4 14] [--live]] [--profile]

The whole table of issue 20 (benchmarks/RESULTS_speed.md gives the exact command): the rows below, then
with ``--e2e`` ``hf-sae train`` seconds per step measured by the difference of two runs, from stored
activations and (``--live``) from the live LM beside a bare LM forward (``bench_e2e.py``). ``--profile``
prints instead the CPU seconds of each part of the trainer's step.

For every (n, k, dead fraction) it prints:

* ``bound``: one B x d x n addmm (with the bias) + ``topk(k)``;
* ``fwd+bwd``: our forward + backward (``kernel="torch"``, the CPU ``auto`` choice);
* ``step``: the trainer's whole optimizer step, ``SAETrainer._step`` itself (dead masks from the token
  counters, forward with AuxK, backward, fire counters, metric window, ``SAEAdam``: decoder-gradient
  projection, clipping at 1.0, fused Adam, decoder renormalisation) on an ``SAETrainer`` built the way
  ``train()`` builds it (in-memory data, no output written);
* ``plain``: a plain sparse torch TopK step (``plain_sparse_step`` below: top-k indices without a graph,
  the k pre-activations again through ``F.embedding``, the decode through ``F.embedding_bag``, autograd
  (index_add gradients), AuxK when latents are dead, fused Adam; no projection, clipping or renorm);
* ``sparsify``: EleutherAI sparsify's ``SparseCoder`` step as its trainer runs it (forward with the dead
  mask, fvu + auxk_alpha * auxk, backward, gradient projection, torch Adam, renorm, fired mask), when
  ``sparsify`` is importable (a separate environment; not a dependency of hf_sae);
* ``dense`` (``kernel="dense"``: F.linear + top-k + dense [B, n] code + dense decoder, plain autograd),
  forward + backward;
* the peak RSS our fwd+bwd and the dense step add above what was resident before them (VmHWM after
  resetting it through /proc/self/clear_refs, Linux only), and the optimizer side alone: ``SAEAdam.step``
  (``opt s``) and the unfused update it replaced (``unfused opt s``: projection with [n, d] temporaries,
  ``clip_grad_norm_``, ``torch.optim.Adam`` without ``fused``, renorm).

All steps of a row start from the same weights; with dead latents the steps include AuxK (k_aux = d/2
by default, over the dead latents only).

Dead latents come in two kinds (``--dead-kind``), both a random set of the given fraction of latents:

* ``realistic``: dead latents are latents that do not fire. Their b_enc is lowered so that their
  pre-activations are > 0 on 0.5% of the (token, dead latent) pairs -- in a trained SAE (SmolLM2-135M
  layer 6, n = 4608, 30% dead) 0.55% are -- so they never reach the main top-k. AuxK then decodes only
  the few dead pre-activations > 0 (its block is pruned to the most of them in one row, "aux w").
* ``random`` (worst case): the random set of latents of the random-init SAE is only *declared* dead. These
  latents fire in the main top-k as often as live ones, and every one of the k_aux AuxK slots of every
  token has a positive pre-activation, so AuxK does its full k_aux-wide work. Unrealistic, kept as the
  upper bound of AuxK's cost.

On a GPU (``--device cuda``) the table compares, per (n, k, dead fraction) and ``--dtype`` (fp32, or
bf16 parameters and inputs; the kernels accumulate in fp32): the bound (addmm + top-k), our step with
the Triton kernels (table gradients token-major ``atomic``, the default, and latent-major ``sorted``, see
``hf_sae.kernels.triton_kernels``), our step with the torch ops on CUDA, and the dense-autograd step;
times are CUDA-synchronised means over ``--iters`` steps, minimum over ``--repeats`` rounds; memory is
the peak CUDA allocation each step adds (``torch.cuda.max_memory_allocated``).

The cases of a configuration run round-robin in one process so that load from other processes hits
them alike; times are the minimum over ``--repeats`` rounds, the ratios ``x/bound`` and ``x/step`` are
medians over rounds of the ratio within a round, and ``cpu`` columns ratios of minimum process CPU
times (steadier than wall time on a shared machine). Every step includes freeing the old gradients (set
to None) as a trainer's ``zero_grad`` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import bench_e2e
import torch
import torch.nn.functional as F

from hf_sae import SAEConfig, SparseAutoencoder


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn, prepare=None) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, peak RSS added in MB) of one call of fn; ``prepare`` runs
    first, untimed."""
    if prepare is not None:
        prepare()
    base = _rss_mb("VmRSS")
    ok = _reset_peak()
    c = time.process_time()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    peak = _rss_mb("VmHWM") - base if ok else float("nan")
    return dt, cpu, peak


REALISTIC_POSITIVE = 0.005
"""Fraction of (token, dead latent) pre-activations > 0 in the realistic case (0.55% measured in a trained SAE)."""


def random_dead_mask(n: int, dead_frac: float, device=None) -> torch.Tensor | None:
    """bool [n] with round(dead_frac * n) random latents set (global RNG), or None for dead_frac = 0."""
    if dead_frac <= 0:
        return None
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[torch.randperm(n, device=device)[: int(round(dead_frac * n))]] = True
    return dead


@torch.no_grad()
def make_realistic(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> None:
    """Lower b_enc of the ``dead`` latents (in place) so that REALISTIC_POSITIVE of their pre-activations
    on x [B, d] are > 0 (the empirical quantile over at most 1024 rows)."""
    rows = x[:1024].to(sae.W_enc.dtype)
    pre = torch.nn.functional.linear(rows - sae.b_dec, sae.W_enc[dead], sae.b_enc[dead]).float().flatten()
    cut = pre.kthvalue(max(1, int(round((1 - REALISTIC_POSITIVE) * pre.numel())))).values
    sae.b_enc[dead] -= cut.to(sae.b_enc.dtype)


@torch.no_grad()
def dead_stats(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None) -> dict:
    """What AuxK sees on this batch: the fraction of (token, dead latent) pre-activations > 0, the width
    of the fused step's AuxK block (min(k_aux, most positives in one row)) and the fraction of the main
    top-k slots taken by dead latents."""
    if dead is None:
        return dict(pos_frac=float("nan"), aux_w=0, dead_in_topk=float("nan"))
    pre = sae._pre(x.to(sae.W_enc.dtype))
    top = pre.topk(sae.config.k, dim=-1, sorted=False).indices
    positive = pre[:, dead] > 0
    k_aux = min(sae.config.effective_k_aux, int(dead.sum()))
    return dict(pos_frac=float(positive.float().mean()), aux_w=min(k_aux, int(positive.sum(1).max())),
                dead_in_topk=float(dead[top].float().mean()))


def _step_fn(sae, x, dead, table_grad_mode=None):
    """One training step (old gradients dropped, forward with AuxK's dead mask, backward) as a closure;
    ``table_grad_mode`` sets the Triton table-gradient form (``HF_SAE_TRITON_TABLE_GRAD``) first."""
    def go():
        if table_grad_mode is not None:
            os.environ["HF_SAE_TRITON_TABLE_GRAD"] = table_grad_mode
        for p in sae.parameters():
            p.grad = None
        sae(x, dead_mask=dead).loss.backward()
    return go


def _bound_fn(sae, x, k):
    """The bound as a closure: one B x d x n encoder addmm and the top-k."""
    def go():
        pre = torch.addmm(sae.b_enc, x, sae.W_enc.t())
        pre.topk(k, dim=-1, sorted=False)
    return go


HOOK = "bench"


def trainer_for(d: int, n: int, k: int, B: int, workdir: str):
    """An ``SAETrainer`` set up as ``train()`` sets it up (SAE, counters, Accelerate-prepared bundle and
    SAEAdam), on in-memory data, ready for ``trainer._step([batch], window)``; no output is written."""
    from hf_sae.training import SAETrainer, SAETrainingArguments

    args = SAETrainingArguments(hook_points=[HOOK], n_latents=n, k=k, batch_size=B, train_tokens=1000 * B,
                                output_dir=workdir, log_with=["none"], progress_bar=False, eval_tokens=0,
                                eval_every_tokens=0, checkpoint_every_tokens=0, plot_report=False,
                                mixed_precision="no", kernel="torch")
    trainer = SAETrainer(args, train_data={HOOK: torch.zeros(B, d)})
    trainer._prepare(trainer._build_saes(trainer.configs))
    return trainer


class PlainSparseStep:
    """The plain sparse baseline: a TopK SAE training step in plain torch (module docstring, ``plain``).

    Loss = FVU (+ aux_coef * AuxK over the dead latents' top-k_aux pre-activations, normalised by the
    residual's variance), as in SPEC; no decoder projection, clipping or renormalisation."""

    def __init__(self, sae: SparseAutoencoder, lr: float = 1e-4):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = (
            sae.get_parameter(name).detach().clone().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.k, self.k_aux, self.aux_coef = sae.config.k, sae.config.effective_k_aux, sae.config.aux_coef
        self.opt = torch.optim.Adam(self.params, lr=lr, fused=True)

    def _code(self, xc, idx):
        """ReLU of the pre-activations of latents idx [B, w] (with a graph)."""
        pre = torch.einsum("bd,bwd->bw", xc, F.embedding(idx, self.W_enc))
        return (pre + F.embedding(idx, self.b_enc[:, None])[..., 0]).relu()

    def __call__(self, x, dead=None):
        for p in self.params:
            p.grad = None
        xc = x - self.b_dec
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc.t())
            idx = pre.topk(self.k, dim=-1, sorted=False).indices
        x_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=self._code(xc, idx), mode="sum") + self.b_dec
        loss = F.mse_loss(x_hat, x, reduction="sum") / (x - x.mean(0)).square().sum()
        if dead is not None and self.aux_coef > 0:
            with torch.no_grad():
                k_aux = min(self.k_aux, int(dead.sum()))
                aux_idx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
            e = x - x_hat.detach()
            e_hat = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=self._code(xc, aux_idx), mode="sum")
            loss = loss + self.aux_coef * F.mse_loss(e_hat, e, reduction="sum") / (e - e.mean(0)).square().sum()
        loss.backward()
        self.opt.step()


def sparsify_step_fn(sae: SparseAutoencoder, x, dead):
    """sparsify's SparseCoder step as sparsify's trainer runs it (module docstring), on ``sae``'s weights;
    None when sparsify is not importable."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its CPU path: embedding_bag (Triton needs a GPU)
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    n, d = sae.W_dec.shape
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=sae.config.k))
    with torch.no_grad():
        sc.encoder.weight.copy_(sae.W_enc)
        sc.encoder.bias.copy_(sae.b_enc)
        sc.W_dec.copy_(sae.W_dec)
        sc.b_dec.copy_(sae.b_dec)
    opt = torch.optim.Adam(sc.parameters(), lr=1e-4)
    did_fire = torch.zeros(n, dtype=torch.bool)

    def go():
        sc.set_decoder_norm_to_unit_norm()
        out = sc(x, dead_mask=dead)
        (out.fvu + sae.config.aux_coef * out.auxk_loss).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        did_fire[out.latent_indices.flatten()] = True
    return go


def unfused_update(sae: SparseAutoencoder, opt: torch.optim.Optimizer, max_grad_norm: float = 1.0) -> None:
    """The optimizer side the trainer ran before SAEAdam: projection with [n, d] temporaries,
    clip_grad_norm_, torch.optim.Adam (not fused), renormalisation."""
    with torch.no_grad():
        g, w = sae.W_dec.grad, sae.W_dec
        g.sub_((g * w).sum(-1, keepdim=True) / w.square().sum(-1, keepdim=True).clamp_min(1e-12) * w)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
        opt.step()
        sae.normalize_decoder_()


class _CpuTimers:
    """Process CPU seconds accumulated per name by wrapped callables (``wrap``); ``restore`` unwraps."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            c = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.process_time() - c
        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def profile_step(B: int, d: int, n: int, k: int, dead_frac: float, rounds: int, kind: str = "realistic",
                 seed: int = 0) -> None:
    """Print the process CPU seconds of each part of the trainer's step (``SAETrainer._step`` on a trainer
    set up by ``_prepare``; the parts timed by wrapping the callables it calls) and of the bound, per step,
    mean over ``rounds`` steps after one warm-up step."""
    import hf_sae.training.trainer as trainer_mod

    torch.manual_seed(seed)
    x = torch.randn(B, d)
    dead = random_dead_mask(n, dead_frac)
    workdir = tempfile.mkdtemp(prefix="bench_train_step_")
    trainer = trainer_for(d, n, k, B, workdir)
    sae = trainer._saes()[HOOK]
    if dead is not None and kind == "realistic":
        make_realistic(sae, x, dead)
    thr = sae.config.dead_tokens_threshold
    bound = _bound_fn(sae, x, k)
    window = trainer_mod._Window()
    t = _CpuTimers()
    parts = [(trainer.model, "forward", "forward (SAE forward, AuxK, losses)"),
             (trainer.accelerator, "backward", "backward"),
             (trainer_mod, "latent_sums", "fire counts + L0 (latent_sums)"),
             (window, "add", "metric window"),
             (trainer.optimizer, "step", "optimizer step (SAEAdam), all"),
             (sae, "remove_parallel_grad_", "  projection + its norm"),
             (torch, "_fused_adam_", "  fused Adam kernel"),
             (sae, "normalize_decoder_", "  renormalisation"),
             (trainer.optimizer, "zero_grad", "zero_grad")]
    try:
        for owner, attr, name in parts:
            t.wrap(owner, attr, name)
        for r in range(rounds + 1):
            trainer.since_fired[HOOK] = (torch.where(dead, thr, 0) if dead is not None
                                         else torch.zeros(n, dtype=torch.int64))
            if r == 1:
                t.total.clear()
            c = time.process_time()
            trainer._step([{HOOK: x}], window)
            t.total["whole step"] = t.total.get("whole step", 0.0) + time.process_time() - c
            c = time.process_time()
            bound()
            t.total["bound (addmm + top-k)"] = t.total.get("bound (addmm + top-k)", 0.0) + time.process_time() - c
    finally:
        t.restore()
        shutil.rmtree(workdir, ignore_errors=True)
    tot = {name: v / rounds for name, v in t.total.items()}
    named = sum(tot.get(name, 0.0) for _, _, name in parts if not name.startswith("  "))
    tot["rest of the step (dead mask, lr, counters)"] = tot["whole step"] - named
    opt = tot.get("optimizer step (SAEAdam), all", 0.0)
    tot["  rest of the optimizer (norms, clip, Python)"] = opt - sum(tot.get(name, 0.0) for _, _, name in parts
                                                                     if name.startswith("  "))
    b = tot["bound (addmm + top-k)"]
    print(f"# profile of the trainer's step: n={n} k={k} B={B} d={d} dead={_dead_label(dead_frac, kind)}, "
          f"{torch.get_num_threads()} threads; process CPU s per step, mean of {rounds}; load average "
          f"{os.getloadavg()[0]:.1f}")
    _print_header("| part | CPU s | x bound |")
    order = ["bound (addmm + top-k)", "whole step"] + [name for _, _, name in parts]
    order[order.index("optimizer step (SAEAdam), all") + 4:order.index("optimizer step (SAEAdam), all") + 4] = [
        "  rest of the optimizer (norms, clip, Python)"]
    for name in order + ["rest of the step (dead mask, lr, counters)"]:
        print(f"| {name} | {tot.get(name, 0.0):.3f} | {tot.get(name, 0.0) / b:.3f} |")


def run_config(B: int, d: int, n: int, k: int, dead_frac: float, repeats: int, dense_repeats: int,
               kind: str = "random", seed: int = 0, peers=("plain", "sparsify")) -> dict:
    from hf_sae.training.trainer import _Window

    torch.manual_seed(seed)
    x = torch.randn(B, d)
    dead = random_dead_mask(n, dead_frac)
    workdir = tempfile.mkdtemp(prefix="bench_train_step_")
    trainer = trainer_for(d, n, k, B, workdir)
    cfg = trainer.configs[HOOK]
    tsae = trainer._saes()[HOOK]
    if dead is not None and kind == "realistic":
        make_realistic(tsae, x, dead)
    fused = SparseAutoencoder(cfg)
    fused.load_state_dict(tsae.state_dict())
    stats = dead_stats(fused, x, dead)
    print(f"  dead pre-activations > 0: {stats['pos_frac']:.2%}, AuxK block width {stats['aux_w']}, "
          f"dead latents in the main top-k: {stats['dead_in_topk']:.2%}", file=sys.stderr, flush=True)
    dense = SparseAutoencoder(SAEConfig(**{**cfg.to_dict(), "kernel": "dense"})) if dense_repeats else None
    if dense is not None:
        dense.load_state_dict(fused.state_dict())

    def free_grads():
        for sae in (fused, dense):
            for p in sae.parameters() if sae is not None else ():
                p.grad = None

    thr = cfg.dead_tokens_threshold

    def set_counters():  # the dead mask of every trainer step = ``dead``
        free_grads()
        trainer.since_fired[HOOK] = torch.where(dead, thr, 0) if dead is not None else torch.zeros(n, dtype=torch.int64)

    window = _Window()
    cases = {"bound": (_bound_fn(fused, x, k), free_grads), "fused": (_step_fn(fused, x, dead), free_grads),
             "step": (lambda: trainer._step([{HOOK: x}], window), set_counters)}
    if "plain" in peers:
        plain = PlainSparseStep(fused)
        cases["plain"] = (lambda: plain(x, dead), free_grads)
    if "sparsify" in peers:
        go = sparsify_step_fn(fused, x, dead)
        if go is None:
            print("  sparsify is not importable: no sparsify column", file=sys.stderr, flush=True)
        else:
            cases["sparsify"] = (go, free_grads)
    times = {name: [] for name in list(cases) + ["dense"]}
    cpus = {name: [] for name in times}
    peaks = {name: [] for name in times}
    ratios = {name: [] for name in cases}  # x / bound and x / step within a round: same load
    for fn, prep in cases.values():
        prep()
        fn()  # warm-up (first-touch allocations, lazy inits, optimizer state)
    # the optimizer side alone: SAEAdam (the trainer's) and the unfused update it replaced
    ref_opt = torch.optim.Adam(fused.parameters(), lr=1e-4)
    t_update, t_unfused = [], []
    for _ in range(2):
        free_grads()
        _step_fn(fused, x, dead)()
        grads = [p.grad.clone() for p in fused.parameters()]
        t_unfused.append(measure(lambda: unfused_update(fused, ref_opt))[0])
        for p, g in zip(tsae.parameters(), grads):
            p.grad = g
        t_update.append(measure(trainer.optimizer.step)[0])
        trainer.optimizer.zero_grad(set_to_none=True)
    del grads
    for r in range(repeats):
        for name, (fn, prep) in cases.items():
            dt, cpu, pk = measure(fn, prep)
            times[name].append(dt)
            cpus[name].append(cpu)
            peaks[name].append(pk)
        for name in cases:
            ratios[name].append(times[name][-1] / times["bound"][-1])
        if r < dense_repeats:
            if r == 0:
                _step_fn(dense, x, dead)()  # warm-up
            dt, cpu, pk = measure(_step_fn(dense, x, dead), free_grads)
            times["dense"].append(dt)
            cpus["dense"].append(cpu)
            peaks["dense"].append(pk)
        print(f"  round {r + 1}/{repeats}: " + "  ".join(f"{k_}={v[-1]:.3f}s" for k_, v in times.items() if v)
              + f"  step/bound={ratios['step'][-1]:.2f}; cpu s: "
              + "  ".join(f"{k_}={v[-1]:.3f}" for k_, v in cpus.items() if v), file=sys.stderr, flush=True)
    out = dict(n=n, k=k, dead=dead_frac, kind=kind, update=min(t_update), unfused=min(t_unfused), **stats)
    out["ratio"] = statistics.median(ratios["fused"])
    print(f"  opt s: SAEAdam {min(t_update):.3f}, unfused {min(t_unfused):.3f}", file=sys.stderr, flush=True)
    for name in cases:
        out[name + "/bound"] = statistics.median(ratios[name])
        out[name + "/step"] = statistics.median(a / b for a, b in zip(times[name], times["step"]))
    for name in times:
        out[name] = min(times[name]) if times[name] else float("nan")
        out[name + "_cpu"] = min(cpus[name]) if cpus[name] else float("nan")
        out[name + "_peak"] = max(peaks[name]) if peaks[name] else float("nan")
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def run_config_cuda(B: int, d: int, n: int, k: int, dead_frac: float, repeats: int, iters: int,
                    dtype: torch.dtype, kind: str = "random", seed: int = 0) -> dict:
    """One (n, k, dead, kind) configuration on CUDA: seconds per step (and peak MB added) of each case."""
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    x = torch.randn(B, d, device=dev, dtype=dtype)
    dead = random_dead_mask(n, dead_frac, device=dev)
    saes = {}
    for name, kernel in (("triton", "triton"), ("torch", "torch"), ("dense", "dense")):
        saes[name] = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=k, kernel=kernel)).to(dev, dtype)
        if name == "triton" and dead is not None and kind == "realistic":
            make_realistic(saes[name], x, dead)
        if name != "triton":
            saes[name].load_state_dict(saes["triton"].state_dict())
    ref_sae = saes["triton"]

    def step(sae, mode=None):
        return _step_fn(sae, x, dead, mode)

    bound = _bound_fn(ref_sae, x, k)

    cases = {"bound": bound, "triton_sorted": step(saes["triton"], "sorted"),
             "triton_atomic": step(saes["triton"], "atomic"), "torch": step(saes["torch"]),
             "dense": step(saes["dense"])}
    times = {name: [] for name in cases}
    peaks = {name: 0.0 for name in cases}
    for fn in cases.values():  # warm-up: compilation, autotuning, allocator
        fn()
        fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in cases.items():
            for sae in saes.values():
                for p in sae.parameters():
                    p.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1000 / iters)
            peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated() - base) / 2**20)
    os.environ.pop("HF_SAE_TRITON_TABLE_GRAD", None)
    out = dict(n=n, k=k, dead=dead_frac, kind=kind)
    for name in cases:
        out[name] = min(times[name])
        out[name + "_peak"] = peaks[name]
    return out


def main_cuda(args) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, batch {args.batch} tokens, "
          f"d={args.d}; seconds per step: mean of {args.iters} steps, min of {args.repeats} rounds")
    rows = _run_all(args, lambda n, k, dead, kind: run_config_cuda(args.batch, args.d, n, k, dead, args.repeats,
                                                                   args.iters, dtype, kind))
    head = ("|      n |   k |          dead | bound ms | triton sorted ms | triton atomic ms | torch-on-cuda ms "
            "| dense ms | atomic/bound | dense/atomic | peak+ atomic MB | peak+ dense MB |")
    _print_header(head)
    for r in rows:
        print(f"| {r['n']:6d} | {r['k']:3d} | {_dead_label(r['dead'], r['kind']):>13} | {1e3 * r['bound']:8.3f} "
              f"| {1e3 * r['triton_sorted']:16.3f} "
              f"| {1e3 * r['triton_atomic']:16.3f} | {1e3 * r['torch']:16.3f} | {1e3 * r['dense']:8.3f} "
              f"| {r['triton_atomic'] / r['bound']:12.2f} | {r['dense'] / r['triton_atomic']:12.2f} "
              f"| {r['triton_atomic_peak']:15.0f} | {r['dense_peak']:14.0f} |")


def _dead_label(dead: float, kind: str) -> str:
    return "0%" if dead <= 0 else f"{dead:.0%} {kind}"


def _print_header(head: str) -> None:
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")


def _run_all(args, run_one) -> list:
    """run_one(n, k, dead, kind) for every configured row, announcing each on stderr."""
    rows = []
    for n, k, dead, kind in _configs(args):
        print(f"n={n} k={k} dead={_dead_label(dead, kind)} ...", file=sys.stderr, flush=True)
        rows.append(run_one(n, k, dead, kind))
    return rows


def _configs(args):
    """(n, k, dead fraction, dead kind) of every row; dead = 0 has one row whatever the kinds."""
    for n in args.n:
        for k in args.k:
            for dead in args.dead:
                for kind in (args.dead_kind if dead > 0 else ["random"]):
                    yield n, k, dead, kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--k", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--dead", type=float, nargs="+", default=[0.0, 0.25], help="fractions of dead latents")
    ap.add_argument("--dead-kind", nargs="+", default=["realistic", "random"], choices=["realistic", "random"],
                    help="realistic: dead latents do not fire (0.5%% of their pre-activations > 0); random: a "
                         "random set of live latents declared dead (worst case for AuxK)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1, help="timed rounds of the (slow) dense step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", nargs="*", default=["plain", "sparsify"], choices=["plain", "sparsify"],
                    help="CPU only: other steps timed in the same rounds (sparsify when importable)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="CUDA only: parameter/input dtype")
    ap.add_argument("--iters", type=int, default=10, help="CUDA only: steps per timed round")
    ap.add_argument("--profile", action="store_true",
                    help="CPU only: instead of the table, the CPU seconds of each part of the trainer's step "
                         "(every configured row, --repeats steps each)")
    ap.add_argument("--e2e", action="store_true",
                    help="CPU only: after the table, hf-sae train seconds per step by the difference of two runs "
                         "(bench_e2e.py) at the first --n and --k, beside the table's step")
    bench_e2e.add_args(ap)
    args = ap.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda but torch sees no CUDA device")
        return main_cuda(args)
    torch.set_num_threads(args.threads)
    os.environ.pop("HF_SAE_KERNEL", None)
    if args.profile:
        for n, k, dead, kind in _configs(args):
            profile_step(args.batch, args.d, n, k, dead, args.repeats, kind)
        return

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} tokens, "
          f"d={args.d}; times: min of {args.repeats} (dense: {args.dense_repeats}) rounds; load average at the start: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = _run_all(args, lambda n, k, dead, kind: run_config(args.batch, args.d, n, k, dead, args.repeats,
                                                              args.dense_repeats, kind, peers=args.peers))
    head = ("|     n |   k |          dead | aux w | bound s | fwd+bwd s | step s | plain s | sparsify s "
            "| fwd+bwd/bound | step/bound | step/bound cpu | plain/step | sparsify/step | opt s | unfused opt s "
            "| dense s | dense/fwd+bwd | peak+ fwd+bwd MB | peak+ dense MB |")
    _print_header(head)
    nan = float("nan")
    for r in rows:
        print(f"| {r['n']:5d} | {r['k']:3d} | {_dead_label(r['dead'], r['kind']):>13} | {r['aux_w']:5d} "
              f"| {r['bound']:7.3f} | {r['fused']:9.3f} | {r['step']:6.3f} | {r.get('plain', nan):7.3f} "
              f"| {r.get('sparsify', nan):10.3f} | {r['ratio']:13.2f} | {r['step/bound']:10.2f} "
              f"| {r['step_cpu'] / r['bound_cpu']:14.2f} | {r.get('plain/step', nan):10.2f} "
              f"| {r.get('sparsify/step', nan):13.2f} | {r['update']:5.3f} | {r['unfused']:13.3f} "
              f"| {r['dense']:7.3f} | {r['dense'] / r['fused']:13.1f} | {r['fused_peak']:16.0f} "
              f"| {r['dense_peak']:14.0f} |")
    print("# dead: 'realistic' = dead latents that do not fire (b_enc lowered: 0.5% of their pre-activations > 0, "
          "as in a trained SAE); 'random' = a random set of live latents declared dead (worst case: all k_aux "
          "AuxK slots positive). aux w: width of the fused step's AuxK block (min(k_aux, most dead "
          "pre-activations > 0 in one row)).")
    print(f"# x/bound, x/step: medians over rounds of the within-round ratios; cpu: ratio of the minimum process "
          f"CPU times; other times: minimum wall seconds. Load average at the end: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores.")
    if args.e2e:
        n, k = args.n[0], args.k[0]
        step = next((r["step"] for r in rows if (r["n"], r["k"], r["dead"]) == (n, k, 0.0)), None)
        print(f"hf-sae train, steps {args.steps} ...", file=sys.stderr, flush=True)
        res = bench_e2e.run(n, k, args.batch, args.d, tuple(args.steps), args.threads, args.live)
        print()
        bench_e2e.print_rows(res, n, k, args.batch, args.d, args.steps, step)
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
