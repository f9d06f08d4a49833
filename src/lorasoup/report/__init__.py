"""Reports: results tables, plots (matplotlib PNGs) and static Markdown/HTML pages.

- ``plots``: the figures (bar chart of methods, layer × module heatmaps, energy and rank curves);
- ``markdown``: Markdown tables and the Markdown → HTML rendering (images embedded);
- ``runs``: what a run directory is (demo, cat, merge, compress, eval, train) and what it points to;
- ``sections`` and ``build``: ``lorasoup report RUN_DIR...``, one page over several runs.
"""

from __future__ import annotations

from lorasoup.report.markdown import markdown_table, markdown_to_html
from lorasoup.report.plots import methods_bar_chart, weights_grid, weights_heatmap

__all__ = ["markdown_table", "markdown_to_html", "methods_bar_chart", "weights_grid", "weights_heatmap"]
