"""Explain latents from their contexts with an LM, and score the explanations (after Bills et al. 2023 and
EleutherAI's delphi): the prompts, the detection and fuzzing tests, and their metrics.

- **Explanation**: the LM sees the latent's ``n_explain`` top-activating contexts with the activating
  tokens marked ``<<like this>>`` and answers with a short phrase.
- **Detection**: the LM sees the explanation and one context (no marks) and answers Yes/No: does the
  latent fire in it? Positives are the latent's random firing samples (held out: never shown when
  explaining), negatives are random contexts where the latent is silent. Scores: accuracy (P(Yes) > 0.5)
  and AUROC of P(Yes).
- **Fuzzing**: the LM sees the explanation and a firing context with some tokens marked, and answers
  Yes/No: are the marked tokens the ones the explanation describes? Correct marks are the tokens where
  the latent fires; wrong marks are as many random other tokens of the same context.
- **Baseline**: the same detection with each explanation given to another latent (a derangement of the
  explanations), so that accuracy above it is due to the explanation, not to the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

__all__ = [
    "explain_prompt",
    "detection_prompt",
    "fuzzing_prompt",
    "auroc",
    "accuracy",
    "render_context",
    "clean_explanation",
]

SYSTEM = "You are a meticulous AI researcher studying the features of a language model. Answer briefly and precisely."


def render_context(ctx: dict, tok: Sequence[str], marks: Optional[set] = None) -> str:
    """The context's text, with the tokens at indices ``marks`` wrapped in ``<<`` ``>>`` (default: none)."""
    parts = []
    for j, t in enumerate(ctx["t"]):
        s = tok[t]
        if marks and j in marks:
            lead = s[: len(s) - len(s.lstrip())]
            s = f"{lead}<<{s.lstrip()}>>"
        parts.append(s)
    return "".join(parts).replace("\n", " ")


def firing_marks(ctx: dict) -> set:
    """Indices of the context's tokens where the latent fires."""
    return {j for j, v in enumerate(ctx["v"]) if v > 0}


def explain_prompt(contexts: Sequence[dict], tok: Sequence[str]) -> list:
    lines = "\n".join(f"{i + 1}. {render_context(c, tok, firing_marks(c))}" for i, c in enumerate(contexts))
    user = (
        "A feature of a language model fires on the tokens marked <<like this>> in these text excerpts:\n"
        f"{lines}\n\nWhat do the marked tokens have in common? Answer with one short phrase, no more than "
        "ten words, and nothing else."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def detection_prompt(explanation: str, ctx: dict, tok: Sequence[str]) -> list:
    user = (
        f"A feature of a language model fires on: {explanation}\n\nText: {render_context(ctx, tok)}\n\n"
        "Does the feature fire somewhere in this text? Answer Yes or No."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def fuzzing_prompt(explanation: str, ctx: dict, tok: Sequence[str], marks: set) -> list:
    user = (
        f"A feature of a language model fires on: {explanation}\n\nText: {render_context(ctx, tok, marks)}\n\n"
        "Are the tokens marked <<like this>> the ones the feature fires on? Answer Yes or No."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def wrong_marks(ctx: dict, rng: random.Random) -> set:
    """As many marks as the context has firing tokens, on tokens where the latent does not fire."""
    fire = firing_marks(ctx)
    others = [j for j in range(len(ctx["t"])) if j not in fire]
    return set(rng.sample(others, min(len(others), max(1, len(fire)))))


def clean_explanation(text: str) -> str:
    """First line of an LM answer, without quotes, list markers or a trailing period; "" stays ""."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    line = line.strip().strip('"').strip("'").lstrip("-*0123456789. ").rstrip(".").strip()
    return line[:200]


def accuracy(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> float:
    """Fraction of (score > threshold) == label; NaN for no items."""
    if not scores:
        return float("nan")
    return sum((s > threshold) == bool(y) for s, y in zip(scores, labels)) / len(scores)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting
    one half (the Mann-Whitney statistic); NaN when one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))
