"""The feature browser: per-latent statistics from one LM + SAE pass, written as a static site.

- ``collect``: the streaming pass (top contexts, random samples, histograms, densities) and the logit
  effects / decoder neighbours of every latent;
- ``site``: the site's data files and shipped assets (``assets/``), readable back from Python;
- ``build``: ``build_dashboard`` and the ``hf-sae dashboard`` command.
"""

from .build import DEFAULT_TEXTS, add_dashboard_args, build_dashboard, run_dashboard

__all__ = ["DEFAULT_TEXTS", "add_dashboard_args", "build_dashboard", "run_dashboard"]
