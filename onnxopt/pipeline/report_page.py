"""The sweep and sensitivity report pages: one self-contained HTML file with the table and matplotlib charts
(inline SVG). Needs the [report] extra.
"""
from __future__ import annotations

from ..errors import UsageError
from .sweep import SweepResult, number, sensitivity_table, table


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--report needs matplotlib: pip install 'onnxopt[report]'") from None
    return plt


def _svg(fig) -> str:
    import io

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    fig.clf()
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _page(title: str, intro: str, charts: list[str], body: str) -> str:
    """One self-contained page: inline SVG charts, no scripts, nothing fetched."""
    import html

    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}} "
            "pre{background:#f6f6f6;padding:1em} table{border-collapse:collapse;margin:1em 0} "
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} td:first-child{text-align:left}"
            f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
            + "".join(f"<figure>{svg}</figure>" for svg in charts) + body + "</body></html>")


def _tradeoff_chart(plt, result: SweepResult, key: str, title: str, unit: str) -> str | None:
    """Score vs `key` (size or latency), every candidate a dot, the front as red stars joined by a line."""
    ref, points = result.reference, [r for r in result.rows if r[key] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for front, style in ((False, {"color": "#9aa", "marker": "o"}), (True, {"color": "#d33", "marker": "*",
                                                                             "s": 120})):
        chosen = [r for r in points if r["front"] == front]
        ax.scatter([r[key] for r in chosen], [r["score"] for r in chosen],
                   label="Pareto front" if front else "candidate", **style)
    line = sorted((r for r in points if r["front"]), key=lambda r: r[key])
    ax.plot([r[key] for r in line], [r["score"] for r in line], color="#d33", linewidth=1)
    if key == "size":
        ax.axvline(ref["size"], color="#333", linestyle=":", label="input model size")
    ax.axhline(ref["score"], color="#333", linestyle="--", label=f"input model {ref['metric']}")
    ax.set(xlabel=f"{title} ({unit})", ylabel=ref["metric"], title=f"{ref['metric']} vs {title}")
    ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def _front_layers(result: SweepResult, most: int = 4) -> tuple[list[str], list[tuple[str, dict]]]:
    """The layers any of the (at most `most`, smallest first) front candidates changed, and per column (the input
    model, then those candidates) its label and {layer: {"params", "flops"}}; a layer a candidate left alone
    keeps the input model's figures."""
    front = sorted((r for r in result.rows if r["front"]), key=lambda r: r["size"])[:most]
    before: dict[str, dict] = {}
    for r in front:
        for x in r["layers"]:
            before.setdefault(x["name"], {"params": x["params_before"], "flops": x["flops_before"]})
    columns = [("input model", before)]
    for r in front:
        changed = {x["name"]: {"params": x["params_after"], "flops": x["flops_after"]} for x in r["layers"]}
        columns.append((r["label"], {name: changed.get(name, figures) for name, figures in before.items()}))
    return list(before), columns


def _layer_chart(plt, result: SweepResult, what: str) -> str | None:
    """Per layer, `what` (params or flops) of the input model beside each front candidate's: grouped bars."""
    import numpy as np

    names, columns = _front_layers(result)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names) * len(columns) / 2))
    height = 0.8 / len(columns)
    for i, (label, figures) in enumerate(columns):
        ax.barh(np.arange(len(names)) + i * height, [figures[n][what] for n in names], height, label=label)
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize=7)
    ax.invert_yaxis()
    noun = "parameters" if what == "params" else "float FLOPs per sample"
    ax.set(xlabel=noun, title=f"per-layer {noun}: input model vs the Pareto front")
    ax.legend(fontsize=7)
    return _svg(fig)


def _layer_table(result: SweepResult) -> str:
    import html

    names, columns = _front_layers(result)
    if not names:
        return ""
    head = "".join(f"<th colspan='2'>{html.escape(label)}</th>" for label, _ in columns)
    sub = "<th>params</th><th>FLOPs</th>" * len(columns)
    rows = "".join(f"<tr><td>{html.escape(n)}</td>"
                   + "".join(f"<td>{f[n]['params']:,}</td><td>{f[n]['flops']:,}</td>" for _, f in columns) + "</tr>"
                   for n in names)
    return (f"<h2>Per layer: the Pareto front</h2><table><tr><th rowspan='2'>layer</th>{head}</tr>"
            f"<tr>{sub}</tr>{rows}</table>")


def html_report(result: SweepResult) -> str:
    """One self-contained page: the table; score vs size and vs latency with the front highlighted; per-layer
    params and FLOPs of the input model and the front's candidates (matplotlib, inline SVG)."""
    import html

    plt = _pyplot()
    charts = [_tradeoff_chart(plt, result, "size", "file size", "bytes"),
              _tradeoff_chart(plt, result, "latency_ms", "latency (batch of 8)", "ms"),
              _layer_chart(plt, result, "params"), _layer_chart(plt, result, "flops")]
    plt.close("all")
    ref = result.reference
    intro = (f"{len(result.rows)} candidates against the input model ({ref['metric']} {ref['score']:.4f}, "
             f"{ref['size']:,} bytes).")
    return _page("onnxopt sweep", intro, [c for c in charts if c],
                 f"<pre>{html.escape(table(result))}</pre>{_layer_table(result)}")


def sensitivity_html(result: dict) -> str:
    """The sensitivity table and one chart: score vs value, a line per layer, the input model's score dashed."""
    import html

    plt = _pyplot()
    values = list(dict.fromkeys(r["value"] for r in result["rows"]))
    x_of = {v: number(v) for v in values}
    numeric = None not in x_of.values()
    if not numeric:
        x_of = {v: i for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in dict.fromkeys(r["layer"] for r in result["rows"]):
        points = sorted((x_of[r["value"]], r["score"]) for r in result["rows"] if r["layer"] == layer)
        ax.plot(*zip(*points), marker="o", label=layer)
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.axhline(result["reference"], color="#333", linestyle="--", label=f"input model {result['metric']}")
    ax.set(xlabel=f"{result['step']}.{result['option']}", ylabel=result["metric"],
           title=f"sensitivity: {result['step']} on one layer at a time")
    ax.legend(fontsize=7, loc="lower right")
    chart = _svg(fig)
    plt.close("all")
    intro = (f"{result['step']}.{result['option']} over {len(values)} values, one layer at a time, every other "
             f"layer left as it is; {result['metric']} of the input model {result['reference']:.4f}.")
    return _page("onnxopt sensitivity", intro, [chart], f"<pre>{html.escape(sensitivity_table(result))}</pre>")
