"""gradflow.report: figures, HTML and PDF reports from run and study directories.

The only layer that imports matplotlib and seaborn. It never selects a matplotlib backend: figures
are ``matplotlib.figure.Figure`` objects on an Agg canvas, created without pyplot, so importing it
leaves an interactive user's backend and pyplot state untouched.

Public API::

    rs = load_runs(["runs/lstm", "studies/cells"])          # RunSet: metadata + concatenated tables
    fig = fig_distance(rs.table("distance"), rs.table("decay"))
    build_report(["studies/cells"], html="reports/cells/index.html", pdf="reports/cells/report.pdf")
    figure("distance", ["studies/cells"])                    # the same Figure the report embeds
    rs.verdicts()                                            # VerdictTable; rs renders in Jupyter

Every figure function is pure: tidy DataFrame(s) in (the tables of :mod:`gradflow.tables`), one
``matplotlib.figure.Figure`` out.
"""

from __future__ import annotations

from .build import FIGURES, build_report, figure
from .fig_gradients import fig_distance
from .fig_heatmap import fig_gradnorm_heatmap
from .fig_jacobians import fig_products, fig_spectra
from .fig_training import fig_clipping, fig_gates
from .load import RunInfo, RunSet, StudyInfo, load_runs
from .notebook import VerdictTable
from .sections import plan, verdict_table

__all__ = [
    "build_report",
    "figure",
    "FIGURES",
    "VerdictTable",
    "load_runs",
    "RunSet",
    "RunInfo",
    "StudyInfo",
    "plan",
    "verdict_table",
    "fig_gradnorm_heatmap",
    "fig_distance",
    "fig_spectra",
    "fig_products",
    "fig_gates",
    "fig_clipping",
]
