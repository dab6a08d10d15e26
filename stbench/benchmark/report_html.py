"""The self-contained HTML leaderboard: the tables, their headers and notes, and plots embedded as
base64 PNG (per-slice PCC box plots; predicted vs true spatial maps and gene-gene correlation heatmaps
when prediction files are given). Inline CSS only, no script and no external URL, so the file opens
offline and renders in headless Chromium; the same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stbench.benchmark import report_plots
from stbench.benchmark import results as res
from stbench.benchmark.leaderboard import GENERATED, Section

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;
color:#1b1b1b;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.8em 0 .4em;border-bottom:2px solid #1f4e79;
padding-bottom:.2em}
p.meta{color:#555;font-size:.85em}
dl.hdr{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;font-size:.85em;margin:.5em 0 1em}
dl.hdr dt{font-weight:600}dl.hdr dd{margin:0}
div.tw{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:.8em;margin:.4em 0}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap;vertical-align:top}
th{white-space:normal;vertical-align:bottom}
th{background:#1f4e79;color:#fff}td.l,th.l{text-align:left}tr:nth-child(even) td{background:#f4f7fb}
td.b{font-weight:700}span.sd{font-size:.85em;color:#555}sup{color:#a33}ol.notes{font-size:.8em;color:#444}
details summary{cursor:pointer}details code{display:block;font-size:.85em;text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.8em;color:#555}
code{background:#f1f1f1;padding:0 3px;border-radius:3px}
tr.ref td{font-style:italic;color:#555;background:#fbf6e9}
"""


def _html_text(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _img(png: bytes, alt: str) -> str:
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    )


def render_html(
    sections: Sequence[Section],
    sources: Sequence[str],
    predictions: Mapping[str, Mapping[str, Path]] | None = None,
) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>stbench leaderboard</title><style>{_CSS.strip()}</style></head><body>",
        "<h1>stbench leaderboard</h1>",
        f'<p class="meta">{_html_text(GENERATED)}<br>Sources: {_html_text("; ".join(sources))}.</p>',
    ]
    if not sections:
        out.append("<p>No result rows.</p>")
    if len(sections) > 1:
        out.append(
            "<ul>"
            + "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
            + "</ul>"
        )
    for s in sections:
        out.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2><dl class="hdr">')
        out += [f"<dt>{html.escape(label)}</dt><dd>{_html_text(text)}</dd>" for label, text in s.header]
        out.append(
            '</dl><div class="tw"><table><thead><tr>'
            + "".join(
                (
                    f'<th class="l">{html.escape(c)}</th>'
                    if c in ("method", "weights")
                    else f"<th>{html.escape(c)}</th>"
                )
                for c in s.columns
            )
            + "</tr></thead><tbody>"
        )
        for i, row in enumerate(s.cells):
            tds = []
            for j, c in enumerate(row):
                cls = " ".join(x for x in ("l" if j in (1, 2) else "", "b" if c.bold else "") if x)
                mean, _, sd = c.text.partition(" ± ")  # sd under the mean keeps wide tables on screen
                body = html.escape(mean) + (f'<br><span class="sd">± {html.escape(sd)}</span>' if sd else "")
                body += "".join(f"<sup>[{k}]</sup>" for k in c.notes)
                if s.columns[j] == "jobs":
                    ids = "".join(f"<code>{html.escape(j_id)}</code>" for j_id in s.job_ids[i])
                    body = f"<details><summary>{html.escape(c.text)}</summary>{ids}</details>"
                tds.append(f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>")
            ref = i < len(s.kinds) and s.kinds[i] == "reference"  # references: marked, never ranked
            out.append(('<tr class="ref">' if ref else "<tr>") + "".join(tds) + "</tr>")
        out.append("</tbody></table></div>")
        if s.notes:
            out.append('<ol class="notes">' + "".join(f"<li>{_html_text(n)}</li>" for n in s.notes) + "</ol>")
        box = [
            (
                label + (" [ref]" if e.get("kind") == "reference" else ""),
                res.slice_values(rows, "pcc"),
                str(e.get("pcc_null_reason") or ""),
            )
            for label, rows, (_, e) in zip(s.labels, s.entry_rows, s.entries.iterrows(), strict=True)
        ]
        out.append(
            "<figure>"
            + _img(report_plots.pcc_box_plot(box, title=s.title), f"per-slice pcc, {s.title}")
            + "<figcaption>Per-slice gene-wise PCC of every row (one point per test slide and seed); "
            "rows without a PCC are marked n/a.</figcaption></figure>"
        )
        figs = (
            report_plots.prediction_figures(
                list(zip(s.labels, s.entry_rows, strict=True)),
                predictions,
                marker_genes=_markers(s.entry_rows),
            )
            if predictions
            else None
        )
        if figs is not None:
            slide, maps, heat = figs
            out.append(
                "<figure>" + _img(maps, f"spatial maps, slide {slide}") + "<figcaption>Predicted vs true "
                f"spatial maps on test slide {html.escape(slide)} (spots at obsm['spatial'], colour scale "
                "per gene from the truth); each row's job with the lowest seed and fold.</figcaption></figure>"
            )
            out.append(
                "<figure>" + _img(heat, f"gene-gene correlation, slide {slide}") + "<figcaption>Gene-gene "
                "Pearson correlation, truth and predictions; grey = gene constant in that matrix."
                "</figcaption></figure>"
            )
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _markers(entry_rows: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Figure genes declared by the protocols of a table's rows (in protocol order, no repeats)."""
    from stbench.data.protocols import PROTOCOLS

    out: list[str] = []
    for rows in entry_rows:
        for r in rows:
            proto = PROTOCOLS.get(str(r.get("protocol")))
            for g in proto.marker_genes if proto is not None else ():
                if g not in out:
                    out.append(g)
    return out
