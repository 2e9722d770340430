"""Learning-rate rules: the default LR of Gao et al. and warmup-then-constant/cosine schedules.

Schedules are pure functions of the number of tokens trained so far, so they need no state of
their own: resuming at a token count gives exactly the LR an uninterrupted run had there.
"""

from __future__ import annotations

import math


def default_lr(n_latents: int, base: float = 2e-4) -> float:
    """Adam LR scaled with the dictionary size: ``base / sqrt(n_latents / 2**14)`` (Gao et al. 2024)."""
    if n_latents <= 0:
        raise ValueError(f"n_latents must be positive, got {n_latents}")
    return base / math.sqrt(n_latents / 2 ** 14)


def lr_at(tokens: int, peak_lr: float, total_tokens: int, warmup_tokens: int = 0,
          schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """LR for the optimizer step that starts after ``tokens`` training tokens.

    Linear warmup from ``peak_lr / warmup_steps``-like small values: ``peak * (tokens + 1) / warmup``
    (never exactly 0) for ``tokens < warmup_tokens``; then ``peak`` (``constant``) or a half-cosine from
    ``peak`` down to ``min_ratio * peak`` at ``total_tokens`` (``cosine``).

    Args:
        tokens: tokens trained before this step (>= 0).
        peak_lr: LR after warmup.
        total_tokens: length of the run in tokens (cosine end point).
        warmup_tokens: warmup length in tokens (0 = none).
        schedule: ``constant`` or ``cosine``.
        min_ratio: final LR / peak LR for ``cosine``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown LR schedule {schedule!r}; use 'constant' or 'cosine'")
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return peak_lr * min(1.0, (tokens + 1) / warmup_tokens)
    if schedule == "constant":
        return peak_lr
    span = max(1, total_tokens - warmup_tokens)
    progress = min(1.0, max(0.0, (tokens - warmup_tokens) / span))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
