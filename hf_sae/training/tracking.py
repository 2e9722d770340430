"""What :class:`~hf_sae.training.trainer.SAETrainer` logs: the running window of training metrics between
two records, the trackers ``auto`` expands to, and the hyperparameters as flat values for the trackers.
"""

from __future__ import annotations

import logging
import os
from typing import Union

import torch
from torch import Tensor

from .arguments import SAETrainingArguments

logger = logging.getLogger("hf_sae.training.trainer")


class _Window:
    """Running means of training metrics between two log records."""

    _FIELDS = ("loss", "fvu", "auxk_loss", "l1_loss", "l0_loss", "afa_loss", "multi_topk_fvu")

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add_scalar(self, h: str, name: str, value: Union[float, Tensor]) -> None:
        """Add a float or a 0-d tensor (summed where it lives, read once at ``flush``: no host sync)."""
        key = f"{h}/{name}"
        if isinstance(value, Tensor):
            value = value.detach().double()
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, h: str, out, ls: dict) -> None:
        for name in self._FIELDS:
            v = getattr(out, name, None)
            if v is not None:
                self.add_scalar(h, name, v)
        self.add_scalar(h, "l0", ls["sum_l0"] / max(ls["count"], 1))

    def flush(self, acc, hook_points) -> dict:
        keys = sorted(self.sums)
        vals = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=acc.device) / self.counts[k]
                            for k in keys]) if keys else torch.zeros(0, dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            vals = acc.reduce(vals, reduction="mean")
        self.sums, self.counts = {}, {}
        return dict(zip(keys, vals.tolist()))


def resolve_trackers(names) -> list[str]:
    """Expand ``auto`` into the trackers available here: jsonl, tensorboard (when importable) and wandb
    (when installed and configured through WANDB_API_KEY / WANDB_MODE, so it never prompts); ``none`` = no
    tracker. Explicit names are kept as given."""
    import importlib.util

    out: list[str] = []
    for n in names:
        if n == "auto":
            out.append("jsonl")
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                out.append("tensorboard")
            if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
                out.append("wandb")
        elif n != "none":
            out.append(n)
    return list(dict.fromkeys(out))


def _flat_hparams(args: SAETrainingArguments) -> dict:
    out = {}
    for k, v in args.to_dict().items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
