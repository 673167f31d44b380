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
alternating blocks (measure.compare.alternating_latency): timings taken while other candidates compute would measure the
pool, not the model.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import onnx

from ..errors import UsageError
from ..options import coerce
from . import registry
from .workers import execute, run_candidate, scoring_arrays


@dataclass
class Axis:
    step: str
    option: str
    values: list


def parse_grid(specs: list[str]) -> list[Axis]:
    from .recipe import STEP_EXCLUDED
    from .registry import COMMANDS

    axes = []
    for spec in specs:
        key, sep, values = str(spec).partition("=")
        step, dot, option = key.partition(".")
        where = f"--grid '{spec}'"
        if not sep or not dot or not values:
            raise UsageError(f"invalid {where}: expected STEP.OPTION=V1,V2,... (e.g. factor.rank=0.3,0.5)")
        if step not in COMMANDS:
            raise UsageError(f"{where}: '{step}' is not a command ({', '.join(COMMANDS)})")
        fields = {f.name: f for cls in registry.command(step).groups if cls not in STEP_EXCLUDED
                  for f in dataclasses.fields(cls)}
        if option not in fields:
            raise UsageError(f"{where}: {step} has no option '{option}' (known: {', '.join(sorted(fields))})")
        axes.append(Axis(step, option, [coerce(v, fields[option], where, from_text=True) for v in values.split(",")]))
    if not axes:
        raise UsageError("give at least one --grid STEP.OPTION=V1,V2,...")
    check_count(math.prod(len(a.values) for a in axes), "the grid")
    return axes


MAX_CANDIDATES = 10_000  # each builds and scores a model: more is a typo (or an attack), not a plan


def check_count(count: int, what: str) -> None:
    if count > MAX_CANDIDATES:
        raise UsageError(f"{what} has {count:,} candidates, over the limit of {MAX_CANDIDATES:,}: give fewer values")


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
                registry.parse(command, {**options, **gate})
            except UsageError as exc:
                raise UsageError(f"candidate '{label}': {exc}") from None
        result.append({"label": label, "steps": chosen})
    return result






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
    from ..graph.flops import model_flops
    from ..measure.compare import alternating_latency
    from ..measure.scores import Scorer, require_scores

    gate = {"data": str(data), **({"labels": labels} if labels else {})}
    todo = candidates(axes, base, gate)
    scorer = Scorer(source, data, labels)
    require_scores(scorer)
    result = SweepResult({"score": scorer.reference, "metric": scorer.metric, "size": source.ByteSize(),
                          "flops": model_flops(source)[0]})
    shared = (source.SerializeToString(), gate, scoring_arrays(scorer, labels))
    done = execute(shared, [c["steps"] for c in todo], jobs=jobs, ray=ray, progress=progress, label="sweep")
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
    from ..report import _columns, _size

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


# ---- sensitivity analysis (Distiller's): one layer at a time, every other layer left as it is -------------------
def sensitivity(source: onnx.ModelProto, data, axis: Axis, *, labels: str | None = None, jobs: int = 1,
                ray: str | None = None, progress=None) -> dict:
    """Per layer the step changes, and per value of `axis`: the score when only that layer is changed (`--only`
    its name), every other layer left float. The layers are those the step changes with the first value."""
    from ..measure.scores import Scorer, require_scores

    gate = {"data": str(data), **({"labels": labels} if labels else {})}
    for value in axis.values:  # every value valid before any work
        candidates([Axis(axis.step, axis.option, [value])], None, gate)
    scorer = Scorer(source, data, labels)
    require_scores(scorer)
    shared = (source.SerializeToString(), gate, scoring_arrays(scorer, labels))
    probe = run_candidate(*shared, [(axis.step, {axis.option: axis.values[0]})])
    jobs_list = [(layer["name"], value) for layer in probe["layers"] for value in axis.values]
    check_count(len(jobs_list), "the sensitivity analysis (layers x values)")
    done = execute(shared, [[(axis.step, {axis.option: value, "only": [layer]})] for layer, value in jobs_list],
                    jobs=jobs, ray=ray, progress=progress, label="sensitivity")
    rows = [{"layer": layer, "value": value[0] if isinstance(value, list) else value,
             "score": r["score"]["candidate"], "drop": r["score"]["drop"], "size": r["size"]}
            for (layer, value), r in zip(jobs_list, done)]
    return {"step": axis.step, "option": axis.option, "metric": scorer.metric, "reference": scorer.reference,
            "rows": rows}


def sensitivity_table(result: dict) -> str:
    from ..report import _columns

    values = list(dict.fromkeys(r["value"] for r in result["rows"]))
    by_layer: dict[str, dict] = {}
    for r in result["rows"]:
        by_layer.setdefault(r["layer"], {})[r["value"]] = r["score"]
    head = ["layer"] + [f"{result['option']}={v}" for v in values]
    rows = [[layer] + [f"{scores[v]:.4f}" for v in values] for layer, scores in by_layer.items()]
    return "\n".join(_columns(head, rows) + [f"{result['metric']} of the input model: {result['reference']:.4f}; "
                                              f"each cell: {result['step']} on that layer only"])


def number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "params=0.2", "x2": placed in order, evenly
