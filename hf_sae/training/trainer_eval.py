"""Held-out evaluation of :class:`~hf_sae.training.trainer.SAETrainer`: the held-out activations
(``eval_data``, ``--eval_activations``, or the text source's validation split) and the metrics on them.

A mixin of the trainer, moved out of ``trainer.py`` whole; its methods read the trainer's attributes.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from ..evaluation.reconstruction import ReconstructionStats
from .guards import check_activations
from .sources import _as_hook_dict, is_cache_dir, load_activation_file, take_tokens

logger = logging.getLogger("hf_sae.training.trainer")


class TrainerEvaluation:
    """The held-out evaluation methods of :class:`~hf_sae.training.trainer.SAETrainer`."""

    def _eval_data(self) -> Optional[dict[str, Tensor]]:
        """Held-out activations {hook: [M, d]} (main process), or None when there are none; checked for
        width and finite values (an error names the source and the row)."""
        data = self._read_eval_data()
        if data is not None:
            where = self.args.eval_activations or "eval_data"
            data = {h: data[h] for h in self.args.hook_points}
            for h, x in data.items():
                check_activations(x, self.dims[h], f"held-out activations for {h!r} ({where})")
        return data

    def _read_eval_data(self) -> Optional[dict[str, Tensor]]:
        args, hps = self.args, list(self.args.hook_points)
        self.eval_split, self.eval_dataset = None, None  # recorded in training_info (the card names them)
        if args.eval_tokens == 0:
            return None
        if self._user_eval is not None:
            data = _as_hook_dict(self._user_eval, hps) if isinstance(self._user_eval, (Tensor, dict)) else None
            if data is None:
                raise ValueError("eval_data must be a [M, d] tensor or a dict {hook_point: [M, d]}")
            self.eval_split, self.eval_dataset = "held-out (eval_data)", "in-memory tensors"
            return {h: v[:args.eval_tokens] for h, v in data.items()}
        if args.eval_activations is not None:
            p = args.eval_activations
            if is_cache_dir(p):
                from ..data.hub_cache import open_cache

                ds = open_cache(p, hook_point=hps, shuffle=False)
                source = str(ds.metadata.get("source") or p)
                self.eval_split = source.rsplit(":", 1)[1] if ":" in source else "eval_activations"
                self.eval_dataset = source.rsplit(":", 1)[0] if ":" in source else source
                return {h: ds.to_tensor(h, max_rows=args.eval_tokens) for h in hps}
            data, meta = load_activation_file(p, hps)
            self.eval_split, self.eval_dataset = meta.get("split", "eval_activations"), meta.get("dataset", p)
            return {h: v[:args.eval_tokens] for h, v in data.items()}
        if args.activations is None and self.lm is not None:
            from ..data.stream import ActivationStream

            try:
                stream = ActivationStream(self.lm, self.tokenizer, hps, args.dataset, split="validation",
                                          batch_tokens=min(4096, args.eval_tokens), window=args.context_length,
                                          batch_windows=args.lm_batch_size, shuffle_buffer_tokens=0,
                                          max_tokens=args.eval_tokens, seed=args.seed)
                self.eval_split, self.eval_dataset = "validation", args.dataset
                return take_tokens(iter(stream), args.eval_tokens)
            except (ValueError, FileNotFoundError) as e:
                logger.warning("no held-out split for dataset %r (%s); skipping held-out evaluation", args.dataset, e)
                return None
        logger.warning("no held-out activations (give --eval_activations); skipping held-out evaluation")
        return None

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict]:
        """Held-out FVU / L0 / dead fraction / MSE per hook point (main process; {} elsewhere)."""
        acc = self.accelerator
        results: dict[str, dict] = {}
        saes = self._saes()  # on every process (a collective with latent sharding)
        if acc.is_main_process and self.eval_data is not None:
            for h, sae in saes.items():
                was = sae.training
                sae.eval()
                stats = ReconstructionStats(n_latents=sae.config.n_latents)
                x_all = self.eval_data[h]
                for i in range(0, x_all.shape[0], 4096):
                    x = x_all[i:i + 4096].to(acc.device)
                    out = sae(x)
                    if out.latent_indices is not None:
                        stats.update(x, out.reconstruction, latent_values=out.latent_values,
                                     latent_indices=out.latent_indices)
                    else:
                        stats.update(x, out.reconstruction, latents=out.latents)
                results[h] = stats.compute()
                sae.train(was)
        acc.wait_for_everyone()
        return results
