"""The SAE trainer: one Accelerate loop training one SAE per hook point.

One optimizer step (``SAETrainer._step``), for every hook point h::

    dead_h   = tokens_since_fired_h >= dead_tokens_threshold        (identical on every process)
    out_h    = sae_h(x_h, dead_mask=dead_h)                          (FVU + AuxK [+ L1/L0/AFA/Multi-TopK])
    backward(sum_h out_h.loss)         (DDP averages gradients; gradient accumulation via Accelerate)
    SAEAdam.step(): remove_parallel_grad_(); clip to max_grad_norm; fused Adam at lr_at(tokens); normalize_decoder_()
    fired_h  = all-reduce(sum of fire counts); tokens_since_fired_h <- 0 where fired, += batch_size elsewhere

Data comes from :mod:`hf_sae.training.sources` (tensors, any iterable, an activation cache, or a live
LM); evaluation uses :class:`hf_sae.evaluation.reconstruction.ReconstructionStats` (the same code as
``hf-sae eval``); checkpoints are atomic (:mod:`hf_sae.training.checkpoint`).

The trainer's held-out evaluation (:mod:`~hf_sae.training.trainer_eval`), its output folder and checkpoints
(:mod:`~hf_sae.training.trainer_checkpoint`, with :class:`TrainerState`) and what it logs
(:mod:`~hf_sae.training.tracking`) live in their own modules; :class:`SAETrainer` mixes the first two in.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .._faults import fault_point
from ..configuration_sae import SAEConfig
from ..evaluation.reconstruction import latent_sums
from ..modeling_sae import SparseAutoencoder
from . import checkpoint as ckpt
from .arguments import SAETrainingArguments
from .guards import TrainingDiverged, atomic_export, check_memory
from .init import initialize_sae
from .launch import OutputDirLock, check_launch, launched_without_gpus
from .optim import SAEAdam
from .report import JSONLTracker, write_report
from .schedules import default_lr, lr_at
from .sources import (
    CacheSource,
    DataExhausted,
    IterableSource,
    TensorSource,
    _as_hook_dict,
    is_cache_dir,
    load_activation_file,
    take_tokens,
)
from .tracking import _flat_hparams, _Window, resolve_trackers
from .trainer_checkpoint import TrainerCheckpoints, TrainerState
from .trainer_eval import TrainerEvaluation

logger = logging.getLogger(__name__)

TrainData = Union[Tensor, dict, Any]


class SAEBundle(nn.Module):
    """The SAEs of one run in a single module (one DDP wrapper, one optimizer).

    ``forward(batch {hook: [B, d]}, dead_masks {hook: bool [n]} | None) -> list[SAEOutput]`` in the
    order of ``hook_points``.
    """

    def __init__(self, saes: dict[str, SparseAutoencoder]):
        super().__init__()
        self.hook_points = list(saes)
        self.saes = nn.ModuleList(saes[h] for h in self.hook_points)

    def forward(self, batch: dict[str, Tensor], dead_masks: Optional[dict[str, Tensor]] = None):
        return [sae(batch[h], dead_mask=None if dead_masks is None else dead_masks[h])
                for h, sae in zip(self.hook_points, self.saes)]


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


class SAETrainer(TrainerEvaluation, TrainerCheckpoints):
    """Train one SAE per hook point with the TopK recipe of Gao et al. (see the module docstring).

    Args:
        args: the run's :class:`SAETrainingArguments`.
        train_data: optional in-memory data instead of ``args.activations`` / a live model: a tensor
            [N, d] (one hook point), a dict {hook_point: [N, d]}, or any iterable yielding [B, d]
            tensors or such dicts (each process reads its own share).
        eval_data: optional held-out data, a tensor [M, d] or dict {hook_point: [M, d]}.
        model, tokenizer: an already loaded LM for live streaming (else ``args.model_name_or_path``).

    Every configuration error (bad argument, unknown hook point, resuming a directory written with
    other arguments) is raised from the constructor, before any activation is computed.
    """

    def __init__(self, args: SAETrainingArguments, train_data: Optional[TrainData] = None,
                 eval_data: Optional[Union[Tensor, dict]] = None, model=None, tokenizer=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.args = args
        args.validate(num_processes=None)  # before Accelerate starts (trackers, processes)
        mp = args.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.out = os.path.abspath(args.output_dir)
        self.ckpt_root = os.path.join(self.out, ckpt.CHECKPOINTS_DIR)
        self.log_dir = os.path.join(self.out, "logs")
        _reset_single_process_accelerate_state()
        self.accelerator = Accelerator(
            cpu=launched_without_gpus(),  # torchrun on CPUs: one gloo group, as with ACCELERATE_USE_CPU=true
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mp,
            log_with=self._trackers(args.log_with),
            project_config=ProjectConfiguration(project_dir=self.out, logging_dir=self.log_dir),
        )
        acc = self.accelerator
        check_launch(acc.num_processes)  # N processes asked for, N running -- else stop before any work
        args.validate(num_processes=acc.num_processes)
        self.micro = args.batch_size // (self._data_shard()[1] * args.gradient_accumulation_steps)
        self.resume_from = self._check_output_dir()
        self.lm, self.tokenizer = model, tokenizer
        self._user_eval = eval_data
        self.source, self.dims, self.base_model, self.dataset_name = self._build_source(train_data)
        # Check every SAE configuration now (k <= n_latents etc.), before any work.
        self.configs = {h: args.sae_config(d_in=self.dims[h], hook_point=h, base_model=self.base_model)
                        for h in args.hook_points}
        check_memory(self.configs, self.micro, acc.device, args.tp_size)
        self.state = TrainerState()
        self.init_info: dict = {}

    # ------------------------------------------------------------------ setup
    def _trackers(self, names):
        if isinstance(names, str):
            names = [s for s in names.split(",") if s]
        out = []
        for n in resolve_trackers(names):
            if n == "jsonl":
                out.append(JSONLTracker(self.args.run_name, os.path.join(self.log_dir)))
            elif n in ("tensorboard", "wandb"):
                out.append(n)
        return out or None

    def _data_shard(self) -> tuple[int, int]:
        """(this process's share, number of shares) of the training data: one per process here; one per
        data-parallel replica with latent sharding (``hf_sae.parallel.trainer``)."""
        return self.accelerator.process_index, self.accelerator.num_processes

    def _build_source(self, train_data):
        """(source, {hook: d}, base_model, dataset name); validates hook points against the data/model."""
        args, acc = self.args, self.accelerator
        hps = list(args.hook_points)
        rank, world = self._data_shard()
        if train_data is not None:
            if isinstance(train_data, Tensor):
                train_data = _as_hook_dict(train_data, hps)
            if isinstance(train_data, dict):
                data = _as_hook_dict(train_data, hps)
                self._init_iter = lambda: iter([self._tensor_sample(data)])
                src = TensorSource(data, self.micro, rank, world, seed=args.seed)
                return src, {h: data[h].shape[1] for h in hps}, None, "in-memory tensors"
            one_shot = iter(train_data) is train_data or getattr(train_data, "one_shot", False)
            first, rest = self._peek(train_data, hps)
            if one_shot:
                # one-shot iterator: the peeked batch stays part of the data and is the init sample
                train_data = itertools.chain([first], rest)
                self._init_iter = lambda: iter([first])
            else:
                self._init_iter = lambda: (_as_hook_dict(x, hps) for x in train_data)
            src = IterableSource(train_data, hps, self.micro, rank, world, presharded=False)
            return src, {h: first[h].shape[1] for h in hps}, None, "in-memory iterable"
        if args.activations is not None:
            path = args.activations
            if is_cache_dir(path):
                src = CacheSource(path, hps, self.micro, rank, world, seed=args.seed, streaming=args.streaming)
                meta = src.metadata
                self._init_iter = self._cache_init_iter
                self._cache_scales = {h: m.get("input_scale") for h, m in zip(hps, src.ds.metas)}
                return (src, dict(zip(hps, src.ds.dims)), meta.get("model"),
                        meta.get("source_id") or meta.get("source") or path)
            data, meta = load_activation_file(path, hps)
            self._init_iter = lambda: iter([self._tensor_sample(data)])
            src = TensorSource(data, self.micro, rank, world, seed=args.seed)
            return src, {h: data[h].shape[1] for h in hps}, meta.get("base_model"), meta.get("dataset", path)
        # live: stream from the LM
        from ..data.models import DEFAULT_MODEL_HUB_ID, is_default_model, load_model
        from ..hooks import hook_point_dim, resolve_hook_point

        if self.lm is None:
            self.lm, self.tokenizer = load_model(args.model_name_or_path, device=acc.device, device_map=args.device_map,
                                                 max_memory=args.max_memory, offload_folder=args.offload_folder)
        for h in hps:
            resolve_hook_point(self.lm, h)  # ValueError naming the valid hook points
        from ..data.stream import ActivationStream

        stream = ActivationStream(self.lm, self.tokenizer, hps, args.dataset, split="train",
                                  batch_tokens=self.micro, window=args.context_length,
                                  batch_windows=args.lm_batch_size, seed=args.seed, process_index=rank,
                                  shuffle_buffer_tokens=args.shuffle_buffer_tokens,
                                  num_processes=world, drop_last=True)
        src = IterableSource(stream, hps, self.micro, rank, world, presharded=True)
        self._init_iter = self._live_init_iter
        base = DEFAULT_MODEL_HUB_ID if is_default_model(args.model_name_or_path) else args.model_name_or_path
        dataset = "kjv (hf_sae embedded corpus)" if args.dataset == "default" else args.dataset
        return src, {h: hook_point_dim(self.lm, h) for h in hps}, base, dataset

    @staticmethod
    def _peek(data, hps):
        it = iter(data)
        try:
            first = _as_hook_dict(next(it), hps)
        except StopIteration:
            raise ValueError("the training data is empty") from None
        return first, it

    def _tensor_sample(self, data: dict) -> dict:
        n = next(iter(data.values())).shape[0]
        g = torch.Generator().manual_seed(self.args.seed + 12345)
        rows = torch.randperm(n, generator=g)[:self.args.init_tokens]
        return {h: t[rows] for h, t in data.items()}

    def _cache_init_iter(self):
        from ..data.hub_cache import open_cache

        ds = open_cache(self.args.activations, streaming=self.args.streaming, hook_point=list(self.args.hook_points),
                               batch_size=self.args.init_tokens, shuffle=True, seed=self.args.seed + 1)
        return (_as_hook_dict(x, self.args.hook_points) for x in ds)

    def _live_init_iter(self):
        from ..data.stream import ActivationStream

        a = self.args
        return iter(ActivationStream(self.lm, self.tokenizer, a.hook_points, a.dataset, split="train",
                                     batch_tokens=min(4096, a.init_tokens), window=a.context_length,
                                     batch_windows=a.lm_batch_size, shuffle_buffer_tokens=0,
                                     max_tokens=a.init_tokens, seed=a.seed))

    # ------------------------------------------------------------------ model, optimizer, state
    def _build_saes(self, configs: dict[str, SAEConfig]) -> dict[str, SparseAutoencoder]:
        torch.manual_seed(self.args.seed)
        return {h: SparseAutoencoder(configs[h]) for h in self.args.hook_points}

    def _initialize(self, saes: dict[str, SparseAutoencoder]) -> None:
        """Data-dependent init on a sample (fresh runs only); input_scale is made equal on every process."""
        args, acc = self.args, self.accelerator
        sample = take_tokens(self._init_iter(), args.init_tokens)
        g = torch.Generator().manual_seed(args.seed + 777)
        for h, sae in saes.items():
            # a cache measured E||x||^2 over all its tokens: a better estimate than the sample's
            cache_scale = getattr(self, "_cache_scales", {}).get(h)
            info = initialize_sae(sae, sample[h], tied_init=args.tied_init, b_dec_init=args.b_dec_init_method,
                                  normalize_input=args.normalize_input, input_scale=cache_scale, generator=g)
            self.init_info[h] = info
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            scales = broadcast_object_list([{h: s.config.input_scale for h, s in saes.items()}], from_process=0)[0]
            for h, s in saes.items():
                s.config.input_scale = scales[h]

    def _optimizer(self, saes: dict[str, SparseAutoencoder]) -> SAEAdam:
        """Adam with the recipe's projection, per-SAE clipping and renormalisation (:class:`SAEAdam`)."""
        args = self.args
        groups = []
        for h, sae in saes.items():
            peak = args.lr if args.lr is not None else default_lr(sae.config.n_latents)
            groups.append({"params": list(sae.parameters()), "lr": peak, "peak_lr": peak, "hook_point": h})
        return SAEAdam(groups, list(saes.values()), betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                       max_grad_norm=args.max_grad_norm, project_decoder_grad=args.project_decoder_grad,
                       normalize_decoder=args.normalize_decoder)

    def _check_finite(self, weights: bool = False) -> None:
        """Raise :class:`TrainingDiverged` if the loss (or, with ``weights``, a parameter) became NaN/Inf."""
        bad = int(self._first_bad_step)
        if bad < 0 and weights:
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                bad = self.state.step
        if bad >= 0:
            last = ckpt.newest_valid(self.ckpt_root)
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(
                f"training diverged: the loss became NaN/Inf at step {bad} (lr {lr:.3g}). Nothing from that step on "
                f"was saved; {'the last good checkpoint is ' + last if last else 'no checkpoint had been written'}. "
                "Lower --lr (or --max_grad_norm), or check the activations for extreme values.")

    # ------------------------------------------------------------------ evaluation
    def _saes(self) -> dict[str, SparseAutoencoder]:
        bundle = self.accelerator.unwrap_model(self.model)
        return dict(zip(bundle.hook_points, bundle.saes))

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, SparseAutoencoder]:
        """Run (or resume) training; write the SAEs, reports and logs; return {hook_point: SAE}."""
        lock = OutputDirLock(self.out).acquire() if self.accelerator.is_main_process else None
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict[str, SparseAutoencoder]:
        args, acc = self.args, self.accelerator
        # held-out data is read and checked first: a bad file fails before any work, not after training
        self.eval_data = self._eval_data() if acc.is_main_process else None
        if self.resume_from is not None:
            with open(os.path.join(self.resume_from, "trainer_state.json")) as f:
                saved = json.load(f)
            self._resume_step = saved["step"]
            self.configs = {h: SAEConfig.from_dict(saved["sae_configs"][h]) for h in args.hook_points}
            saes = self._build_saes(self.configs)
        else:
            saes = self._build_saes(self.configs)
            self._initialize(saes)
        self._prepare_output_dir()
        self._prepare(saes)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
            if acc.is_main_process:
                print(f"[hf_sae] resumed from {self.resume_from} at step {self.state.step} "
                      f"({self.state.tokens} tokens)", flush=True)
        acc.init_trackers(args.run_name, config=_flat_hparams(args))

        try:
            self._loop()
            return self._finish()
        finally:
            acc.end_training()
            self._release()

    def _prepare(self, saes: dict[str, SparseAutoencoder]) -> None:
        """Fresh dead-latent counters, the Accelerate-prepared model and optimizer of ``saes``, and the
        divergence marker."""
        acc = self.accelerator
        self.since_fired, self.total_fires = {}, {}
        for h, sae in saes.items():
            n = sae.config.n_latents
            self.since_fired[h] = torch.zeros(n, dtype=torch.int64, device=acc.device)
            self.total_fires[h] = torch.zeros(n, dtype=torch.int64, device=acc.device)
        self.model, self.optimizer = acc.prepare(SAEBundle(saes), self._optimizer(saes))
        # step at which the loss first became NaN/Inf (-1: never); kept on the device, read at log/save time
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=acc.device)

    def _release(self) -> None:
        """Drop the data, the held-out set and Accelerate's references once training is over, so that
        several runs in one process (sweeps) do not keep each other's memory-mapped shards alive."""
        import gc

        self.source = self._init_iter = self.eval_data = self._user_eval = None
        model = getattr(self, "model", None)
        if model is not None:
            for sae in self.accelerator.unwrap_model(model).saes:
                sae.release_grad_buffers()
        self.accelerator._models.clear()
        self.accelerator._optimizers.clear()
        gc.collect()

    def _loop(self) -> None:
        args, acc, st = self.args, self.accelerator, self.state
        A, P = args.gradient_accumulation_steps, acc.num_processes
        hps = list(args.hook_points)
        data = self.source.iterate(start=st.micro_batches)
        from tqdm.auto import tqdm

        bar = tqdm(total=args.train_tokens, initial=min(st.tokens, args.train_tokens), unit="tok",
                   unit_scale=True, dynamic_ncols=True, desc="train SAE", mininterval=1.0,
                   disable=not (acc.is_main_process and args.progress_bar))
        window = _Window()
        t_last = time.perf_counter()
        tokens_last = st.tokens
        while st.tokens < args.train_tokens:
            batches, ok = [], 1
            try:
                for _ in range(A):
                    batches.append(next(data))
            except DataExhausted as e:
                ok = 0
                logger.warning("%s", e)
            if P > 1:
                ok = int(acc.gather(torch.tensor([ok], device=acc.device)).min())
            if not ok:
                logger.warning("training data ran out at %d tokens (asked for %d)", st.tokens, args.train_tokens)
                break
            self._step(batches, window)
            st.micro_batches += A
            prev = st.tokens
            st.tokens += args.batch_size
            st.step += 1
            fault_point("train.step")
            bar.update(min(st.tokens, args.train_tokens) - min(prev, args.train_tokens))
            last = st.tokens >= args.train_tokens
            if st.step % args.log_every_steps == 0 or last:
                self._check_finite()
                now = time.perf_counter()
                rec = window.flush(acc, hps)
                rec["tokens_per_s"] = (st.tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, st.tokens
                for h in hps:
                    rec[f"{h}/dormant_fraction"] = self._dormant_fraction(h)
                    rec[f"{h}/dead_fraction"] = rec[f"{h}/dormant_fraction"]  # deprecated alias of dormant_fraction
                rec["lr"] = self.optimizer.param_groups[0]["lr"]
                self._record(rec)
                h0 = hps[0]
                bar.set_postfix(fvu=f"{rec[f'{h0}/fvu']:.4f}", l0=f"{rec[f'{h0}/l0']:.1f}",
                                dormant=f"{100 * rec[f'{h0}/dormant_fraction']:.1f}%", refresh=False)
            if _crossed(prev, st.tokens, args.eval_every_tokens) and not last:
                self._record({f"{h}/eval/{k}": v for h, m in self.evaluate().items() for k, v in m.items()
                              if isinstance(v, (int, float))})
            if _crossed(prev, st.tokens, args.checkpoint_every_tokens) and not last:
                self.save_checkpoint()
        bar.close()

    def _step(self, batches: list[dict[str, Tensor]], window: _Window) -> None:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (see the module docstring)."""
        args, acc, st = self.args, self.accelerator, self.state
        saes = self._saes()
        dead = {h: self.since_fired[h] >= saes[h].config.dead_tokens_threshold for h in saes}
        fires = {h: torch.zeros_like(self.total_fires[h]) for h in saes}
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(st.tokens, group["peak_lr"], args.train_tokens, args.warmup_tokens,
                                args.lr_schedule, args.lr_min_ratio)
        for mb in batches:
            mb = {h: x.to(acc.device, non_blocking=True) for h, x in mb.items()}
            with acc.accumulate(self.model):
                outs = self.model(mb, dead)
                loss = sum(o.loss for o in outs)
                self._first_bad_step = torch.where((self._first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                                   st.step + 1, self._first_bad_step)
                acc.backward(loss)
                for h, o in zip(saes, outs):
                    if o.latent_indices is not None:
                        ls = latent_sums(o.latent_values.detach(), o.latent_indices, n_latents=len(fires[h]))
                    else:
                        ls = latent_sums(latents=o.latents.detach())
                    fires[h] += ls["fire_counts"].to(fires[h].device)
                    window.add(h, o, ls)
                if acc.sync_gradients:
                    self.optimizer.step()  # SAEAdam: projection, clipping, fused Adam, renormalisation
                    for h, gn in zip(saes, self.optimizer.optimizer.grad_norms):
                        if gn is not None:
                            window.add_scalar(h, "grad_norm", gn)
                    self.optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:  # every process must agree on which latents are dead
            flat = acc.reduce(torch.cat([fires[h] for h in saes]), reduction="sum")
            fires = dict(zip(saes, flat.split([len(fires[h]) for h in saes])))
        for h in saes:
            fired = fires[h] > 0
            self.since_fired[h] = torch.where(fired, torch.zeros_like(self.since_fired[h]),
                                              self.since_fired[h] + args.batch_size)
            self.total_fires[h] += fires[h]

    def _dormant_fraction(self, h: str) -> float:
        """Share of ``h``'s latents that have not fired in the last ``dead_tokens_threshold`` training tokens (the
        latents AuxK treats as dead). Not the evaluation's ``dead_fraction``: never fired on the evaluated tokens."""
        thr = self.configs[h].dead_tokens_threshold
        return float((self.since_fired[h] >= thr).double().mean())

    def _record(self, rec: dict) -> None:
        st = self.state
        rec = {"step": st.step, "tokens": st.tokens, **rec}
        st.history.append(rec)
        self.accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=st.step)

    def _finish(self) -> dict[str, SparseAutoencoder]:
        """A final checkpoint, the final evaluation, and the exported SAE folders + reports.

        The checkpoint comes first, so a failure in the evaluation or the export loses no training; --resume
        on a finished run redoes the evaluation and the export without training."""
        args, acc, st = self.args, self.accelerator, self.state
        self.save_checkpoint()
        final = self.evaluate()
        if final:
            self._record({f"{h}/eval/{k}": v for h, m in final.items() for k, v in m.items()
                          if isinstance(v, (int, float))})
        saes = self._saes()
        last_train = next((r for r in reversed(st.history) if "tokens_per_s" in r), {})
        if acc.is_main_process:
            for h, sae in saes.items():
                info = {
                    "dataset": self.dataset_name,
                    "tokens_trained": st.tokens,
                    "steps": st.step,
                    "batch_size": args.batch_size,
                    "num_processes": acc.num_processes,
                    "lr": self.optimizer.param_groups[list(saes).index(h)]["peak_lr"],
                    "lr_schedule": args.lr_schedule,
                    "seed": args.seed,
                    "recipe": {"tied_init": args.tied_init, "auxk": args.use_auxk, "b_dec_init": args.b_dec_init_method,
                               "normalize_input": args.normalize_input, "normalize_decoder": args.normalize_decoder,
                               "project_decoder_grad": args.project_decoder_grad, "multi_topk": args.multi_topk},
                    "init": self.init_info.get(h, {}),
                    "eval_split": getattr(self, "eval_split", None) if final.get(h) else None,
                    "eval_dataset": getattr(self, "eval_dataset", None) if final.get(h) else None,
                    "final_metrics": {
                        **{f"train_{k}": last_train.get(f"{h}/{k}") for k in ("loss", "fvu", "l0", "dormant_fraction")},
                        **{f"eval_{k}": v for k, v in final.get(h, {}).items()},
                    },
                }
                sae.config.training_info = info
                self.configs[h] = sae.config
                folder = os.path.join(self.out, h)
                with atomic_export(folder) as tmp:
                    sae.save_pretrained(tmp)
                    write_report(tmp, h, st.history, {"base_model": sae.config.base_model, **info},
                                 plot=args.plot_report)
        acc.wait_for_everyone()
        return saes


def _reset_single_process_accelerate_state() -> None:
    """Accelerate keeps one global state per process; a second trainer in the same (single) process may
    need other settings (mixed precision, accumulation steps), so forget the previous ones. Distributed
    state (the process group) is never touched."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def make_trainer(args: SAETrainingArguments, **kwargs) -> SAETrainer:
    """The trainer for ``args``: :class:`SAETrainer`, or with ``args.tp_size > 1`` the latent-sharded
    :class:`hf_sae.parallel.trainer.ShardedSAETrainer` (same arguments, same outputs)."""
    if args.tp_size > 1:
        from ..parallel.trainer import ShardedSAETrainer

        return ShardedSAETrainer(args, **kwargs)
    return SAETrainer(args, **kwargs)


def train(args: SAETrainingArguments, train_data: Optional[TrainData] = None,
          eval_data: Optional[Union[Tensor, dict]] = None, model=None, tokenizer=None) -> dict[str, SparseAutoencoder]:
    """Train (or with ``args.resume`` resume) SAEs; returns {hook_point: SparseAutoencoder}.

    Shortcut for ``make_trainer(args, train_data=..., eval_data=..., model=..., tokenizer=...).train()``.
    """
    return make_trainer(args, train_data=train_data, eval_data=eval_data, model=model, tokenizer=tokenizer).train()
