"""Studies: what opens models, images and SAEs to run a metric end to end, taking typed arguments.

The maths is in :mod:`vlmsae.metrics` (pure torch); opening an SAE on the model it reads is
:mod:`vlmsae.models.open_sae`. Here: encoding images to per-image codes (``codes``), the MS study
(``ms_study``, with its embedding cache ``embedding_cache``), the hierarchy study (``hierarchy_study``),
latent names (``naming``, ``autointerp``), seed stability (``stability_study``), the planted-concept check
(``ground_truth``) and the sweep over the SAEs of a folder (``sweep``: one runner for every job).
"""
