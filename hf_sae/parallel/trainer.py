"""``--tp_size P``: the SAE trainer with every SAE's latents sharded over P processes (DP x TP mesh).

:class:`ShardedSAETrainer` is :class:`hf_sae.training.SAETrainer` with four pieces swapped; the loop,
data sources, trackers, evaluation, reports and exports are the trainer's own:

- the model: each SAE is built and initialized as usual (same seed and data sample on every process),
  then sliced into a :class:`~hf_sae.parallel.ShardedSAE`; the data is split over the DP replicas only
  (the P processes of one replica read the same tokens);
- the step: per micro-batch (``gradient_accumulation_steps`` of them) the global-batch loss under the
  Accelerator's autocast, backward of loss / micro-batches; then gradients summed over DP, projection,
  global-norm clipping, Adam on the local rows, decoder renorm, dead-latent counters on the local rows
  (summed over DP);
- checkpoints: ``checkpoint-N/<hook_point>/shard-*.safetensors`` + ``trainer_state.json``, sealed and
  renamed atomically (:mod:`hf_sae.training.checkpoint`); resuming re-shards to the current tp_size;
- exports and evaluation use the consolidated SAE (an all-gather), so the saved folders are normal
  ``save_pretrained`` SAEs.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from ..modeling_sae import SparseAutoencoder
from ..training.schedules import lr_at
from ..training.trainer import SAETrainer, TrainerState
from .checkpoint import load_into, write_shards
from .mesh import make_mesh, reduce_sum
from .sharded import ShardedSAE, ShardedStep
from .step import finish_gradients, update_since_fired


class ShardedBundle(nn.Module):
    """The sharded SAEs of one run: ``forward(batch {hook: [B, d]}, dead {hook: bool [n/P]})`` ->
    list[ShardedStep] in the order of ``hook_points``."""

    def __init__(self, shards: dict[str, ShardedSAE]):
        super().__init__()
        self.hook_points = list(shards)
        self.saes = nn.ModuleList(shards[h] for h in self.hook_points)

    def forward(self, batch: dict[str, Tensor], dead: dict[str, Tensor]) -> list[ShardedStep]:
        return [sae(batch[h], dead_mask=dead[h]) for h, sae in zip(self.hook_points, self.saes)]


class ShardedSAETrainer(SAETrainer):
    """SAETrainer over a DP x TP mesh (``args.tp_size`` > 1); see the module docstring."""

    mesh = None

    def _mesh(self):
        if self.mesh is None:
            self.mesh = make_mesh(self.args.tp_size)
        return self.mesh

    def _data_shard(self) -> tuple[int, int]:
        mesh = self._mesh()
        return mesh.dp_rank, mesh.dp_size

    def _shards(self) -> dict[str, ShardedSAE]:
        return dict(zip(self.model.hook_points, self.model.saes))

    def _prepare(self, saes: dict[str, SparseAutoencoder]) -> None:
        """Slice each SAE (on the CPU, then move the slice), fresh counters of the local latents, an
        optimizer over the local rows (no DDP wrapper: gradients are reduced over DP by the step)."""
        mesh, dev = self._mesh(), self.accelerator.device
        shards = {h: ShardedSAE.from_full(sae, mesh).to(dev) for h, sae in saes.items()}
        self.since_fired = {h: torch.zeros(s.n_local, dtype=torch.int64, device=dev) for h, s in shards.items()}
        self.total_fires = {h: torch.zeros(s.n_local, dtype=torch.int64, device=dev) for h, s in shards.items()}
        self.model, self.optimizer = ShardedBundle(shards), self._optimizer(shards)
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)

    def _saes(self) -> dict[str, SparseAutoencoder]:
        """The whole SAEs (all-gathered: every process must call this)."""
        return {h: shard.to_full() for h, shard in self._shards().items()}

    def _step(self, batches: list[dict[str, Tensor]], window) -> None:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches: each micro-batch's loss
        (its global-batch loss over the DP replicas, under the Accelerator's autocast: bf16 with
        ``--mixed_precision bf16``) is divided by the number of micro-batches and back-propagated, as
        ``accelerator.backward`` does in :class:`SAETrainer`; then one gradient reduction + clipping +
        Adam step, and the dead-latent counters advance once with the fires of every micro-batch."""
        args, st, dev = self.args, self.state, self.accelerator.device
        shards = self._shards()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(st.tokens, group["peak_lr"], args.train_tokens, args.warmup_tokens,
                                args.lr_schedule, args.lr_min_ratio)
        dead = {h: self.since_fired[h] >= shards[h].config.dead_tokens_threshold for h in shards}
        fires = {h: torch.zeros_like(self.since_fired[h]) for h in shards}
        for mb in batches:
            mb = {h: x.to(dev, non_blocking=True) for h, x in mb.items()}
            with self.accelerator.autocast():
                outs = self.model(mb, dead)
            loss = sum(o.output.loss for o in outs)
            self._first_bad_step = torch.where((self._first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                               st.step + 1, self._first_bad_step)
            (loss / len(batches)).backward()
            for h, o in zip(shards, outs):
                fires[h] += o.fires
                window.add(h, o.output, {"sum_l0": float(o.l0), "count": 1})
        for h, shard in shards.items():
            gn = finish_gradients(shard, args.max_grad_norm, args.project_decoder_grad)
            if args.max_grad_norm > 0:
                window.add_scalar(h, "grad_norm", gn)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for h, shard in shards.items():
            if args.normalize_decoder:
                shard.normalize_decoder_()
            fired, self.since_fired[h] = update_since_fired(shard, fires[h], self.since_fired[h], args.batch_size)
            self.total_fires[h] += fired

    def _dormant_fraction(self, h: str) -> float:
        shard = self._shards()[h]
        dead = (self.since_fired[h] >= shard.config.dead_tokens_threshold).sum()
        return float(reduce_sum(dead, self.mesh.tp_group)) / shard.config.n_latents

    def _save_model_state(self, tmp: str) -> None:
        """Every hook point's shards (``tmp/<hook_point>/shard-*.safetensors``: rows, Adam moments, counters)."""
        for h, shard in self._shards().items():
            write_shards(os.path.join(tmp, h), shard, self.optimizer,
                         {"since_fired": self.since_fired[h], "fire_counts": self.total_fires[h]})

    def _load_checkpoint(self, path: str) -> None:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if state.get("tp_size", 1) == 1:
            raise ValueError(f"checkpoint {path} was written without --tp_size (one full SAE per process); "
                             "resume it without --tp_size, or start a new --output_dir")
        self.state = TrainerState(step=state["step"], tokens=state["tokens"], micro_batches=state["micro_batches"],
                                  history=state["history"])
        self.init_info = state.get("init_info", {})
        for h, shard in self._shards().items():
            counters = load_into(os.path.join(path, h), shard, self.optimizer)
            self.since_fired[h] = counters["since_fired"]
            self.total_fires[h] = counters["fire_counts"]
