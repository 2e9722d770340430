"""Run state, output folder and checkpoints of :class:`~hf_sae.training.trainer.SAETrainer`: validating
``output_dir`` against ``--resume`` / ``--overwrite_output_dir``, saving and loading atomic checkpoints
(:mod:`hf_sae.training.checkpoint`).

A mixin of the trainer, moved out of ``trainer.py`` whole; its methods read the trainer's attributes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .._faults import fault_point
from . import checkpoint as ckpt
from .arguments import RESUME_FREE_FIELDS
from .report import truncate_jsonl

logger = logging.getLogger("hf_sae.training.trainer")


@dataclass
class TrainerState:
    """Progress of a run (saved in every checkpoint)."""

    step: int = 0
    """optimizer steps taken"""
    tokens: int = 0
    """training tokens consumed over all processes"""
    micro_batches: int = 0
    """micro-batches drawn by each process (the data position)"""
    history: list = field(default_factory=list)
    """logged metric records {step, tokens, "<hook>/<metric>": value}"""


class TrainerCheckpoints:
    """The output-folder and checkpoint methods of :class:`~hf_sae.training.trainer.SAETrainer`."""

    def _check_output_dir(self) -> Optional[str]:
        """Validate output_dir against --resume / --overwrite_output_dir; return the checkpoint to resume."""
        args = self.args
        saved_args = os.path.join(self.out, "train_args.json")
        if args.resume:
            if self.accelerator.is_main_process:
                ckpt.recover(self.ckpt_root)  # a kill inside a checkpoint swap leaves complete copies aside
            self.accelerator.wait_for_everyone()
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if args.overwrite_output_dir and not args.resume:
            return None  # wiped in _prepare_output_dir
        if existing and not args.resume:
            raise ValueError(f"--output_dir {self.out} already holds checkpoints of a run; pass --resume to "
                             "continue it, --overwrite_output_dir to start over, or choose a new --output_dir")
        if not args.resume:
            return None
        if os.path.isfile(saved_args):
            with open(saved_args) as f:
                before = json.load(f)
            now = args.to_dict()
            diff = {k: (before.get(k), now[k]) for k in now
                    if k not in RESUME_FREE_FIELDS and before.get(k) != now[k]}
            if diff:
                lines = "; ".join(f"--{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"cannot resume {self.out}: it was made by a different configuration ({lines}). "
                                 "Rerun with the original arguments, or use a new --output_dir.")
        found = ckpt.newest_valid(self.ckpt_root)
        if found is None and existing:
            logger.warning("no valid checkpoint in %s (all incomplete); starting afresh", self.ckpt_root)
        elif found is None:
            logger.warning("--resume: no checkpoint in %s yet; starting a new run", self.ckpt_root)
        return found

    def _state_tensors(self) -> dict[str, Tensor]:
        out = {}
        for h in self.args.hook_points:
            out[f"{h}/tokens_since_fired"] = self.since_fired[h].cpu()
            out[f"{h}/fire_counts"] = self.total_fires[h].cpu()
        return out

    def save_checkpoint(self) -> Optional[str]:
        """Write an atomic checkpoint of the current state (all processes must call this).

        Refuses (:class:`TrainingDiverged`) to save non-finite weights. A checkpoint already on disk for the
        same token count (a finished run resumed) is kept as it is, not rewritten."""
        acc, st = self.accelerator, self.state
        self._check_finite(weights=True)
        name = ckpt.checkpoint_name(st.tokens)
        tmp = os.path.join(self.ckpt_root, ".tmp-" + name)
        final = os.path.join(self.ckpt_root, name)
        exists = ckpt.is_valid(final) if acc.is_main_process else False
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            exists = broadcast_object_list([exists], from_process=0)[0]
        if exists:
            return final
        if acc.is_main_process:
            os.makedirs(self.ckpt_root, exist_ok=True)
            ckpt.clean_temporaries(self.ckpt_root)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        self._save_model_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": st.step, "tokens": st.tokens, "micro_batches": st.micro_batches,
                     "num_processes": acc.num_processes, "tp_size": self.args.tp_size, "history": st.history,
                     "sae_configs": {h: self.configs[h].to_dict() for h in self.args.hook_points},
                     "init_info": self.init_info, "args": self.args.to_dict()}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, default=float)
            fault_point("checkpoint.state_saved")
            ckpt.seal(tmp)
            fault_point("checkpoint.sealed")
            ckpt.publish(tmp, final)
            ckpt.apply_retention(self.ckpt_root, self.args.save_total_limit)
        acc.wait_for_everyone()
        return final

    def _save_model_state(self, tmp: str) -> None:
        """Write the SAEs, optimizer, RNG states and dead-latent counters into ``tmp`` (every process)."""
        self.accelerator.save_state(tmp)
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(self._state_tensors(), os.path.join(tmp, "trainer_tensors.safetensors"))

    def _load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if state.get("tp_size", 1) > 1:
            raise ValueError(f"checkpoint {path} holds latent-sharded SAEs (--tp_size {state['tp_size']}); resume "
                             "with --tp_size > 1 (any divisor of n_latents and of the process count)")
        self.accelerator.load_state(path)
        if state["num_processes"] != self.accelerator.num_processes:
            # same global batch either way, but the data order of iterable sources is per process
            logger.warning("checkpoint %s was written by %d processes, resuming with %d: the weights continue "
                           "exactly, the data order does not", path, state["num_processes"],
                           self.accelerator.num_processes)
        self.state = TrainerState(step=state["step"], tokens=state["tokens"], micro_batches=state["micro_batches"],
                                  history=state["history"])
        self.init_info = state.get("init_info", {})
        tensors = load_file(os.path.join(path, "trainer_tensors.safetensors"))
        dev = self.accelerator.device
        for h in self.args.hook_points:
            self.since_fired[h] = tensors[f"{h}/tokens_since_fired"].to(dev)
            self.total_fires[h] = tensors[f"{h}/fire_counts"].to(dev)

    def _prepare_output_dir(self) -> None:
        acc, args = self.accelerator, self.args
        if acc.is_main_process:
            if args.overwrite_output_dir and not args.resume:
                for p in (self.ckpt_root, self.log_dir):
                    shutil.rmtree(p, ignore_errors=True)
            os.makedirs(self.out, exist_ok=True)
            if self.resume_from is None:
                args.to_json_file(os.path.join(self.out, "train_args.json"))
                metrics = os.path.join(self.log_dir, "metrics.jsonl")
                if os.path.exists(metrics):  # a fresh start: drop the log of an earlier (killed) attempt
                    os.remove(metrics)
            else:
                truncate_jsonl(os.path.join(self.log_dir, "metrics.jsonl"), self._resume_step)
        acc.wait_for_everyone()
