"""The share-error heatmap: pruned candidates x donor candidates, with a "no donor" column.

Plain data in, ``go.Figure`` out, like ``app.figures`` (whose layout helpers it uses); block ids
are 0-based and labelled so.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from app.figures import BLOCK_AXIS, _base, failsafe

__all__ = ["NO_DONOR", "share_heatmap"]

NO_DONOR = "no donor"  # the heatmap's extra column: a rank-r fit of the pruned block alone


@failsafe
def share_heatmap(matrix: Sequence[Sequence[float | None]], rows: Sequence[int], cols: Sequence[int],
                  donors: Mapping[int, int | None] | None = None, *, label: str = "share error",
                  title: str = "", colorbar: str = "",
                  no_donor: Sequence[float | None] | None = None) -> go.Figure:
    """The share-error matrix restricted to pruned candidates (rows) x donor candidates (columns).

    Args:
        matrix: the full ``(L, L)`` matrix, ``matrix[i][j]`` = error of rebuilding block ``i`` from donor ``j``.
        rows: block ids shown as rows (pruned candidates).
        cols: block ids shown as columns (possible donors).
        donors: ``{pruned: donor}`` to mark with a circle; a ``None`` donor marks the "no donor" column.
        label: what a cell's number is (hover text); colorbar: a short colorbar title.
        no_donor: ``(L,)`` error of each block rebuilt with no donor (its own rank-r fit alone): drawn
            as a last column, set apart, the value every donor in its row must beat.
    """
    def clean(v) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    z = [[clean(matrix[i][j]) for j in cols] for i in rows]
    x = [str(j) for j in cols]
    hover = [[f"rebuild block {i} from donor {j} (0-based)<br>{label}: {v:.4g}" if v is not None
              else f"block {i} / donor {j}: not computed" for j, v in zip(cols, zr)] for i, zr in zip(rows, z)]
    if no_donor is not None:
        x.append(NO_DONOR)
        for i, zr, hr in zip(rows, z, hover):
            v = clean(no_donor[i]) if 0 <= i < len(no_donor) else None
            zr.append(v)
            hr.append(f"block {i} (0-based) with no donor: a rank-r fit of its own weights<br>{label}: {v:.4g}"
                      if v is not None else f"block {i} with no donor: not computed")
    ylab = [f"block {i}" for i in rows]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=ylab, colorscale="YlOrRd", hovertext=hover,
                               hoverinfo="text", colorbar=dict(title=colorbar or "error")))
    if no_donor is not None and cols:  # a gap line: the last column is a baseline, not a block
        fig.add_shape(type="line", x0=len(cols) - 0.5, x1=len(cols) - 0.5, y0=0, y1=1, xref="x", yref="paper",
                      line=dict(color="#333", width=3))
    if donors:
        pts = [(NO_DONOR if j is None else str(j), f"block {i}") for i, j in donors.items()
               if i in rows and (j in cols or (j is None and no_donor is not None))]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                                     name="suggested donor (lowest error among kept blocks)",
                                     marker=dict(symbol="circle-open", size=16, color="#1f3b73", line=dict(width=3)),
                                     hoverinfo="skip"))
    fig.update_xaxes(title="donor candidate, " + BLOCK_AXIS, type="category")
    fig.update_yaxes(title="pruned candidate, " + BLOCK_AXIS, type="category", autorange="reversed")
    height = max(320, min(900, 120 + 22 * len(rows)))
    return _base(fig, title or "Share error: how well each kept block (+ a rank-r correction) rebuilds a pruned one",
                 height)
