"""sweep: every combination of a grid of options, each run as the pipeline would run it, measured against the
input model: score on --data (accuracy, or top-1 agreement), file size, float FLOPs, latency; the Pareto front
(higher score, smaller file, lower latency) marked.

    --grid STEP.OPTION=V1,V2,...   split at the first '=' (the option), then at ',' (the values); STEP names a
                                   command (factor, binarize, prune, lower, quantize); values are typed as the CLI
                                   types the option. Without --recipe, the steps are the grid's commands in the
                                   order they first appear; with one, the grid sets options of the recipe's first
                                   step of that command.

Candidates are built and scored in a process pool (--jobs; each worker gets the model bytes and one candidate's
steps). Latency is timed afterwards in this process, one candidate at a time against the input model in
alternating blocks (measure.alternating_latency): timings taken while other candidates compute would measure the
pool, not the model.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import onnx

from . import options as opt
from .errors import UsageError


@dataclass
class Axis:
    step: str
    option: str
    values: list


def _typed(text: str, fld: dataclasses.Field, where: str) -> Any:
    """A grid value as the CLI would parse it for this option."""
    meta = fld.metadata
    try:
        if meta.get("repeat"):
            return [text]
        if fld.default is False:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if meta.get("kind") is int:
            return int(text)
        if meta.get("kind") is float:
            return float(text)
    except ValueError:
        kind = "true or false" if fld.default is False else "an integer" if meta.get("kind") is int else "a number"
        raise UsageError(f"{where}: value '{text}' is not {kind}") from None
    return text


def parse_grid(specs: list[str]) -> list[Axis]:
    from .recipe import COMMANDS, STEP_EXCLUDED

    axes = []
    for spec in specs:
        key, sep, values = str(spec).partition("=")
        step, dot, option = key.partition(".")
        where = f"--grid '{spec}'"
        if not sep or not dot or not values:
            raise UsageError(f"invalid {where}: expected STEP.OPTION=V1,V2,... (e.g. factor.rank=0.3,0.5)")
        if step not in COMMANDS:
            raise UsageError(f"{where}: '{step}' is not a command ({', '.join(COMMANDS)})")
        fields = {f.name: f for cls in opt.COMMAND_OPTIONS[step] if cls not in STEP_EXCLUDED
                  for f in dataclasses.fields(cls)}
        if option not in fields:
            raise UsageError(f"{where}: {step} has no option '{option}' (known: {', '.join(sorted(fields))})")
        axes.append(Axis(step, option, [_typed(v, fields[option], where) for v in values.split(",")]))
    if not axes:
        raise UsageError("give at least one --grid STEP.OPTION=V1,V2,...")
    return axes


def candidates(axes: list[Axis], base: list[tuple[str, dict]] | None, gate: dict) -> list[dict]:
    """Every combination: {"label": "factor.rank=0.3 binarize.activation_bits=2", "steps": [(command, options)]},
    each validated as the command would validate it (a bad combination is a usage error naming it)."""
    steps = base or [(step, {}) for step in dict.fromkeys(a.step for a in axes)]
    index = {}
    for a in axes:
        position = next((i for i, (command, _) in enumerate(steps) if command == a.step), None)
        if position is None:
            raise UsageError(f"--grid {a.step}.{a.option}: the recipe has no {a.step} step")
        index[(a.step, a.option)] = position
    result = []
    for combo in itertools.product(*(a.values for a in axes)):
        chosen = copy.deepcopy(steps)
        for a, value in zip(axes, combo):
            chosen[index[(a.step, a.option)]][1][a.option] = value
        label = " ".join(f"{a.step}.{a.option}={v[0] if isinstance(v, list) else v}" for a, v in zip(axes, combo)
                         if len(a.values) > 1) or "the grid's one candidate"
        for command, options in chosen:
            try:
                opt.parse(command, {**options, **gate})
            except UsageError as exc:
                raise UsageError(f"candidate '{label}': {exc}") from None
        result.append({"label": label, "steps": chosen})
    return result


def _run_candidate(source_bytes: bytes, gate: dict, scoring: dict, steps: list) -> dict:
    """One candidate, in a worker: the steps, then score, size and FLOPs against the input model. `scoring`: the
    data as arrays ("data": inputs and labels) and the input model's outputs on it ("outputs"), computed once by
    the caller. "layers": what each changed layer had and has (params, FLOPs)."""
    from . import pipeline
    from .inspection import model_flops
    from .report import Report
    from .runtime.measure import Scorer

    source = onnx.load_model_from_string(source_bytes)
    model, merged = source, Report(command="sweep")
    for command, options in steps:
        groups = opt.parse(command, {**options, **gate})
        model, report = pipeline.run(model, pipeline.rewrite_steps(command, groups, None, reference=source),
                                     Report(command=command))
        merged.merge(report)
    score = Scorer(source, scoring["data"], gate.get("labels"), outputs=scoring["outputs"]).drop(model)
    layers = [{k: getattr(x, k) for k in ("name", "params_before", "params_after", "flops_before", "flops_after")}
              for x in merged.changed]
    return {"model": model.SerializeToString(), "score": score, "size": model.ByteSize(),
            "flops": model_flops(model)[0], "layers": layers}


def _scoring(scorer, labels: str | None) -> dict:
    """What every worker needs to score a candidate, as arrays (a Ray node may not see the caller's files)."""
    data = dict(scorer.feeds)
    if scorer.labels is not None:
        data[labels or "label"] = scorer.labels
    return {"data": data, "outputs": scorer.outputs}


def _execute(shared: tuple, each_steps: list, *, jobs: int, ray: str | None, progress, label: str) -> list[dict]:
    """`_run_candidate(*shared, steps)` for each of `each_steps`, results in order: in a local process pool of
    `jobs` workers, or as Ray tasks on the cluster at `ray` (an address, or 'auto')."""
    if ray is not None:
        return _execute_on_ray(shared, each_steps, ray, progress, label)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_run_candidate, *shared, steps) for steps in each_steps]
        return [f.result() for f in (progress(futures, label) if progress else futures)]


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address where nothing listens (Ray itself retries for minutes)."""
    import socket

    if address == "local":
        return
    given = address
    try:
        if address == "auto":  # the cluster `ray start` last recorded here, or RAY_ADDRESS; it may be gone since
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        host, sep, port = address.split("://")[-1].rpartition(":")
        if not sep:
            raise ValueError("expected host:port, 'auto' or 'local'")
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:  # ConnectionError is an OSError
        raise UsageError(f"--ray {given}: no Ray cluster answers at {address} ({str(exc).splitlines()[0]})") from None


def _execute_on_ray(shared: tuple, each_steps: list, address: str, progress, label: str) -> list[dict]:
    """Ray tasks on an existing cluster. What every task shares (the model bytes, the scoring arrays) is put in
    the object store once; each task ships only its steps. One CPU is reserved per task."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'onnxopt[ray]'") from None
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
    task = ray.remote(num_cpus=1, max_retries=0)(_run_candidate)
    refs = [ray.put(a) for a in shared]
    pending = [task.remote(*refs, steps) for steps in each_steps]
    done = (ray.get(ref) for ref in pending)  # in order: the bar moves as the oldest unfinished task ends
    return list(progress(done, label) if progress else done)


@dataclass
class SweepResult:
    reference: dict
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "rows": [{k: v for k, v in r.items() if k != "model"}
                                                      for r in self.rows]}


def pareto(rows: list[dict]) -> None:
    """Mark each row on the front: no other row is at least as good on score, size and latency and better on one."""
    def key(r):
        return (-r["score"], r["size"], r["latency_ms"] if r["latency_ms"] is not None else 0.0)

    for r in rows:
        mine = key(r)
        r["front"] = not any(all(a <= b for a, b in zip(key(o), mine)) and key(o) != mine for o in rows)


def sweep(source: onnx.ModelProto, data, axes: list[Axis], *, base=None, labels: str | None = None, jobs: int = 1,
          ray: str | None = None, latency: bool = True, progress=None) -> SweepResult:
    from .inspection import model_flops
    from .runtime.measure import Scorer, alternating_latency, require_scores

    gate = {"data": str(data), **({"labels": labels} if labels else {})}
    todo = candidates(axes, base, gate)
    scorer = Scorer(source, data, labels)
    require_scores(scorer)
    result = SweepResult({"score": scorer.reference, "metric": scorer.metric, "size": source.ByteSize(),
                          "flops": model_flops(source)[0]})
    shared = (source.SerializeToString(), gate, _scoring(scorer, labels))
    done = _execute(shared, [c["steps"] for c in todo], jobs=jobs, ray=ray, progress=progress, label="sweep")
    feeds = {k: v[:8] for k, v in scorer.feeds.items()}
    for c, r in zip(todo, done):
        model = onnx.load_model_from_string(r["model"])
        timing = alternating_latency(source, model, feeds) if latency else None
        result.rows.append({"label": c["label"], "steps": c["steps"], "score": r["score"]["candidate"],
                            "drop": r["score"]["drop"], "size": r["size"], "flops": r["flops"],
                            "latency_ms": timing["b_ms"] if timing else None,
                            "speedup": timing["speedup"] if timing else None, "layers": r["layers"],
                            "model": r["model"]})
    pareto(result.rows)
    return result


def table(result: SweepResult) -> str:
    """One row per candidate, the front marked with '*', the input model first."""
    from .report import _columns, _size

    ref = result.reference
    rows = [["", "input model", f"{ref['score']:.4f}", _size(ref["size"]), f"{ref['flops']:,}", "", ""]]
    for r in sorted(result.rows, key=lambda r: (not r["front"], -r["score"])):
        rows.append(["*" if r["front"] else "", r["label"], f"{r['score']:.4f}", _size(r["size"]), f"{r['flops']:,}",
                     "" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}",
                     "" if r["speedup"] is None else f"{r['speedup']:.2f}x"])
    head = ["front", "candidate", ref["metric"], "size", "float FLOPs/sample", "latency ms (8)", "speed-up"]
    lines = _columns(head, rows)
    front = sum(r["front"] for r in result.rows)
    return "\n".join(lines + [f"{len(result.rows)} candidates, {front} on the Pareto front (higher {ref['metric']}, "
                              "smaller file, lower latency)"])


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


# ---- sensitivity analysis (Distiller's): one layer at a time, every other layer left as it is -------------------
def sensitivity(source: onnx.ModelProto, data, axis: Axis, *, labels: str | None = None, jobs: int = 1,
                ray: str | None = None, progress=None) -> dict:
    """Per layer the step changes, and per value of `axis`: the score when only that layer is changed (`--only`
    its name), every other layer left float. The layers are those the step changes with the first value."""
    from .runtime.measure import Scorer, require_scores

    gate = {"data": str(data), **({"labels": labels} if labels else {})}
    for value in axis.values:  # every value valid before any work
        candidates([Axis(axis.step, axis.option, [value])], None, gate)
    scorer = Scorer(source, data, labels)
    require_scores(scorer)
    shared = (source.SerializeToString(), gate, _scoring(scorer, labels))
    probe = _run_candidate(*shared, [(axis.step, {axis.option: axis.values[0]})])
    jobs_list = [(layer["name"], value) for layer in probe["layers"] for value in axis.values]
    done = _execute(shared, [[(axis.step, {axis.option: value, "only": [layer]})] for layer, value in jobs_list],
                    jobs=jobs, ray=ray, progress=progress, label="sensitivity")
    rows = [{"layer": layer, "value": value[0] if isinstance(value, list) else value,
             "score": r["score"]["candidate"], "drop": r["score"]["drop"], "size": r["size"]}
            for (layer, value), r in zip(jobs_list, done)]
    return {"step": axis.step, "option": axis.option, "metric": scorer.metric, "reference": scorer.reference,
            "rows": rows}


def sensitivity_table(result: dict) -> str:
    from .report import _columns

    values = list(dict.fromkeys(r["value"] for r in result["rows"]))
    by_layer: dict[str, dict] = {}
    for r in result["rows"]:
        by_layer.setdefault(r["layer"], {})[r["value"]] = r["score"]
    head = ["layer"] + [f"{result['option']}={v}" for v in values]
    rows = [[layer] + [f"{scores[v]:.4f}" for v in values] for layer, scores in by_layer.items()]
    return "\n".join(_columns(head, rows) + [f"{result['metric']} of the input model: {result['reference']:.4f}; "
                                              f"each cell: {result['step']} on that layer only"])


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "params=0.2", "x2": placed in order, evenly


def sensitivity_html(result: dict) -> str:
    """The sensitivity table and one chart: score vs value, a line per layer, the input model's score dashed."""
    import html

    plt = _pyplot()
    values = list(dict.fromkeys(r["value"] for r in result["rows"]))
    x_of = {v: _number(v) for v in values}
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
