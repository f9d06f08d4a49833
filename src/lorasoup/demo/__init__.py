"""The embedded default, ``lorasoup demo``: a skill-composition study that runs in minutes on a CPU.

A miniature of the LoRA Soups GSM-Hard experiment (https://arxiv.org/abs/2410.13025), built from a
seed with no download: see ``benchmark.py`` for the task design, ``study.py`` for the methods, and
docs/demo.md for what the numbers mean. The output directory (written atomically) holds:

- ``report.md`` / ``report.html``: the results table (mean ± std over seeds), the methods' bar chart
  and a heatmap of CAT's learned weights per layer and module;
- ``results.json``: every number, per seed and aggregated; ``run.json``: settings, versions, timings;
- ``seed-N/``: that seed's base model, adapters, merges, CAT artifact and per-example results
  (``eval/<method>/<task>.jsonl``) from which the table is computed.

With ``--set skills=3`` the report adds the K = 3 table and how each method scales with K
(``scaling.png``; per-example files in ``eval-k3/``); with ``--set format_robust=true`` the
format-robustness table (``formats.png``; ``eval-formats/<method>/<frame>.jsonl``). See ``tables.py``.

``model="smollm2"`` (``lorasoup demo --model smollm2``) runs the same study on the real
SmolLM2-135M-Instruct with reasoning-gym data (``real.py``, ``real_study.py``); its converted base
checkpoint is ``base/``, shared by the seeds. ``--model PATH`` (a .gguf file, a checkpoint, a hub id;
mode ``real``, ``demo_choice``) runs that study on another model.

The settings' ``device`` picks where everything runs (``device.py``: a CUDA GPU when there is one);
``jobs`` runs seeds side by side in worker processes (``seeds.py``). ``scale.py`` runs the whole
study over a ladder of base model sizes (``lorasoup study``, docs/study.md).

The demo is an application on top of the library: only the CLI imports it, and nothing in the
library imports it back (``tests/test_import_rules.py``).
"""

from __future__ import annotations

from lorasoup.demo.real_study import RealDemoSettings
from lorasoup.demo.run import MODES, DemoSummary, combine_runs, demo_choice, run_demo, seed_list
from lorasoup.demo.settings import DemoSettings

__all__ = [
    "MODES",
    "DemoSettings",
    "DemoSummary",
    "RealDemoSettings",
    "combine_runs",
    "demo_choice",
    "run_demo",
    "seed_list",
]
