"""Per-layer report: what each pass did to each candidate layer, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

LARGE_ERROR = 0.8  # a layer losing more than this relative error is warned about (0.5 is common and harmless
# for a conv without calibration: the sample CNN keeps its accuracy with conv errors of 0.5-0.7)


@dataclass
class LayerReport:
    name: str
    op_type: str
    shape: str = ""
    action: str = "skipped"  # factored | binarized | lowered | skipped
    reason: str = ""
    rank: int | None = None
    full_rank: int | None = None  # min(m, n) of the factored matrix: rank 81 of 400
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    error: float | None = None  # relative reconstruction error ‖W − W'‖F / ‖W‖F
    bytes_before: int = 0
    bytes_after: int = 0
    channels: str | None = None  # prune: "in 64->32, out 128->64"
    module: str = ""  # the torch module path the layer came from (graph.selection.module_path), if any


def shown_name(name: str, module: str = "") -> str:
    """A layer as reports and `inspect` show it: its module path as the user's framework wrote it, then the
    node name (`layer1.0.conv1 (node_Conv_81)`), or the node name alone."""
    return f"{module} ({name})" if module and module != name else name


@dataclass
class Report:
    command: str
    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    check: dict | None = None  # filled by --check / compare
    output: str | None = None

    steps: list[str] = field(default_factory=list)  # the pipeline steps that ran, in order
    budget: dict | None = None  # factor --budget: the allocation (budget.Allocation.to_dict) and any search
    size: dict | None = None  # the whole model: serialized bytes {"before", "after"}, weights and their bytes
    latency: dict | None = None  # --min-speedup: measure.alternating_latency (a = input model, b = output)
    recipe: dict | None = None  # apply: {"path", "steps": [a summary row per command]}
    patterns: list | None = None  # [{"flag", "pattern", "layers": [names matched]}]
    finetune: dict | None = None  # --finetune: recover/distill.py's summary (loss per epoch, before/after)

    def merge(self, step: "Report") -> None:
        """Add what one pipeline step did. A layer already listed as changed keeps its row and action
        (e.g. binarized), with the sizes the later step left it at (e.g. lowered to bits); other
        rows are appended."""
        self.steps.append(step.command)
        rows = {layer.name: layer for layer in self.changed}
        for layer in step.layers:
            earlier = rows.get(layer.name)
            if earlier is None:
                self.layers.append(layer)
            elif layer.action != "skipped":
                earlier.params_after, earlier.bytes_after = layer.params_after, layer.bytes_after
        self.warnings += [w for w in step.warnings if w not in self.warnings]
        self.budget = step.budget or self.budget
        self.patterns = step.patterns or self.patterns
        self.finetune = step.finetune or self.finetune

    @property
    def changed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action != "skipped"]

    def totals(self) -> dict:
        keys = ("params_before", "params_after", "flops_before", "flops_after", "bytes_before", "bytes_after")
        totals = {k: sum(getattr(layer, k) for layer in self.changed) for k in keys}
        totals["layers_changed"] = len(self.changed)
        totals["layers_skipped"] = len(self.layers) - len(self.changed)
        return totals

    def to_dict(self) -> dict:
        return {"command": self.command, "steps": self.steps, "output": self.output,
                "layers": [_applicable(x) for x in self.layers], "totals": self.totals(), "warnings": self.warnings,
                "check": self.check, "budget": self.budget, "size": self.size, "latency": self.latency,
                "recipe": self.recipe, "patterns": self.patterns, "finetune": self.finetune}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = ["layer", "op", "shape", "action", "rank", "channels", "params", "FLOPs/sample", "rel.err"]
        rows = []
        for x in self.layers:
            if x.action == "skipped":
                rows.append([shown_name(x.name, x.module), x.op_type, x.shape, f"skipped: {x.reason}", "", "", "",
                             "", ""])
                continue
            rank = "" if x.rank is None else f"{x.rank}/{x.full_rank}" if x.full_rank else str(x.rank)
            rows.append([shown_name(x.name, x.module), x.op_type, x.shape, x.action, rank, x.channels or "",
                         _arrow(x.params_before, x.params_after), _arrow(x.flops_before, x.flops_after),
                         "" if x.error is None else f"{x.error:.2e}"])
        t = self.totals()
        rows.append(["total", "", "", f"{t['layers_changed']} changed", "", "",
                     _arrow(t["params_before"], t["params_after"]), _arrow(t["flops_before"], t["flops_after"]), ""])
        keep = [i for i in range(len(head)) if i < 4 or any(r[i] for r in rows)]  # only columns that apply
        lines = _columns([head[i] for i in keep], [[r[i] for i in keep] for r in rows])
        for m in self.patterns or []:
            shown = ", ".join(m["layers"][:4]) + (f", … ({len(m['layers'])} in all)" if len(m["layers"]) > 4 else "")
            lines.append(f"{m['flag']} '{m['pattern']}' matched {len(m['layers'])} layer"
                         f"{'s' if len(m['layers']) != 1 else ''}: {shown}")
        if self.size:  # what the user measures first: the whole file, then the changed layers' share
            z = self.size
            unknown = " (+ layers of unknown size: --input-shape)" if z["flops_unknown_layers"] else ""
            lines.append(f"model file: {_size(z['before'])} -> {_size(z['after'])} "
                         f"({z['after'] / max(z['before'], 1):.1%}); weights {z['weights_before']:,} -> "
                         f"{z['weights_after']:,} ({z['weights_after'] / max(z['weights_before'], 1):.1%}); float "
                         f"FLOPs/sample {z['flops_before']:,} -> {z['flops_after']:,}{unknown}")
        if t["bytes_before"]:
            lines.append(f"changed layers' weights, as their ops store them: {_size(t['bytes_before'])} -> "
                         f"{_size(t['bytes_after'])}")
        if self.budget:
            lines += budget_table(self.budget)
        if self.finetune:
            lines += finetune_lines(self.finetune)
        if self.check:
            lines.append(format_check(self.check))
        if self.latency:
            lines.append(format_latency(self.latency))
        return "\n".join(lines)

    def text(self) -> str:
        """The table (with a recipe's steps first), and where the result was written."""
        steps = recipe_lines(self.recipe) if self.recipe else []
        return "\n".join(steps + [self.table()]) + (f"\nwrote {self.output}" if self.output else "")


def _applicable(layer: LayerReport) -> dict:
    """A layer as JSON, with null for what does not apply to it (sizes of a skipped layer, FLOPs or bytes a
    pass did not count) rather than a 0 that reads as a measurement."""
    row = asdict(layer)
    skipped = layer.action == "skipped"
    for before, after in (("params_before", "params_after"), ("flops_before", "flops_after"),
                          ("bytes_before", "bytes_after")):
        if skipped or not row[before]:
            row[before] = row[after] = None
    return row


def format_check(check: dict) -> str:
    parts = [f"{name}: max abs diff {v['max_abs']:.3g}, max rel diff {v['max_rel']:.3g}"
             for name, v in check["outputs"].items()]
    line = f"check on {check['samples']} samples: " + "; ".join(parts)
    score = check.get("score")
    if score:
        line += (f"\n{score['metric']} on {score['samples']} samples: {score['reference']:.4f} -> "
                 f"{score['candidate']:.4f} (drop {score['drop']:+.4f})")
    return line


def finetune_lines(f: dict) -> list[str]:
    """What distillation did: the loss before and after (held out), the steps and why they stopped, the time."""
    held = f" ({f['held_out_samples']} held out)" if f["held_out_samples"] else ""
    layers = f", {f['matched_tensors']} layer outputs matched" if f["matched_tensors"] else ""
    which = "held-out loss" if f["held_out_samples"] else "loss"
    return [f"finetune: {f['loss']} on {f['train_samples']} samples{held}{' with labels' if f['labels'] else ''}"
            f"{layers}; {f['trained_params']:,} weights in {f['trained_tensors']} tensors trained",
            f"finetune: {f['steps']} of {f['planned_steps']} steps ({f['stopped']}), best at step {f['best_step']}; "
            f"{which} {f['loss_before']:.4f} -> {f['loss_after']:.4f} in {f['seconds']:.1f} s"]


def recipe_lines(recipe: dict) -> list[str]:
    """One line per recipe step: what it changed, the size, and (with gate data) score and speed-up against the
    input model."""
    lines = [f"recipe {recipe['path']}:"]
    for i, row in enumerate(recipe["steps"], 1):
        line = f"  step {i} {row['run']}: {row['layers_changed']} layers changed, model {_size(row['size'])}"
        if row["score"]:
            line += f", {row['score']['metric']} {row['score']['candidate']:.4f} (drop {row['score']['drop']:+.4f})"
        if row["latency"]:
            line += f", {row['latency']['speedup']:.2f}x the input's speed"
        lines.append(line)
    return lines + [""]


def format_latency(latency: dict) -> str:
    return (f"latency (onnxruntime, batch of {latency['samples']}, median of alternating blocks): "
            f"{latency['a_ms']:.3f} ms -> {latency['b_ms']:.3f} ms, {latency['speedup']:.2f}x "
            f"(rounds {latency['spread'][0]:.2f}x..{latency['spread'][1]:.2f}x)")


def budget_table(budget: dict) -> list[str]:
    """The allocation under --budget: per layer the rank chosen (or dense), cost before/after in the budget's
    unit, and the normalised error allotted (share of the layer's energy lost); then the totals."""
    unit = "params" if budget["kind"] == "params" else "FLOPs/sample"
    if budget.get("what") == "channels":  # prune: channels kept per group (its first layer named)
        rows = [[x["name"], f"{x['after']}/{x['before']}", f"{x['error']:.2e}"] for x in budget["layers"]]
        lines = [""] + _columns(["budgeted group", "channels kept", "normalised error"], rows)
    else:
        rows = [[x["name"], "dense" if x["rank"] is None else f"{x['rank']}{' (pinned)' if x['pinned'] else ''}",
                 _arrow(x["before"], x["after"]), f"{x['error']:.2e}"] for x in budget["layers"]]
        lines = [""] + _columns(["budgeted layer", "rank", unit, "normalised error"], rows)
    lines.append(f"budget {budget['budget']}: {budget['used']:,} of {budget['allowed']:,} {unit} allowed "
                 f"(fraction {budget['fraction']:g} of {budget['dense']:,} dense; used "
                 f"{budget['used'] / max(budget['dense'], 1):.1%})")
    for c in budget["search"] or []:
        lines.append(f"  searched fraction {c['fraction']:.3f}: drop {c['drop']:+.4f} "
                     f"{'passes' if c['passed'] else 'fails'}")
    return lines


def _arrow(before: int, after: int) -> str:
    if not before:
        return ""
    return f"{before:,} -> {after:,} ({after / before:.0%})"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _columns(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]


def inspect_table(result: dict) -> str:
    """`onnxopt inspect`'s table: a row per layer, then the model's totals and notes."""
    head = ["layer", "op", "weight", "stored", "params", "FLOPs/sample", "factor", "binarize"]
    table = [[shown_name(r["name"], r.get("module", "")), r["op_type"], r["weight_shape"] or "-",
              r["stored"] or "float", "-" if r["params"] is None else f"{r['params']:,}",
              "?" if r["flops"] is None else f"{r['flops']:,}", r["factor"], r["binarize"]] for r in result["layers"]]
    t = result["totals"]
    lines = _columns(head, table)
    lines.append(f"model: {t['layers']} layers, {t['params']:,} weights ({_size(t['weight_bytes'])}), file "
                 f"{_size(t['model_bytes'])}, {t['flops']:,} FLOPs/sample"
                 f"{' (+ unknown)' if t['flops_unknown_layers'] else ''}")
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])


def compare_text(result: dict, as_json: bool = False) -> str:
    """`onnxopt compare`'s output."""
    if as_json:
        return json.dumps(result, indent=2)
    lines = []
    for key in ("A", "B"):
        r = result[key]
        acc = "" if r["accuracy"] is None else f"accuracy {r['accuracy']:.4f}, "
        lines.append(f"{key}: {acc}median latency {r['latency_ms']:.3f} ms per batch of {result['samples']}")
    spread = result["latency"]["spread"]
    lines.append(f"B/A speed-up {result['latency']['speedup']:.2f}x (alternating timed blocks, per-round range "
                 f"{spread[0]:.2f}x..{spread[1]:.2f}x)")
    if result["top1_agreement"] is not None:
        lines.append(f"top-1 agreement {result['top1_agreement']:.4f}")
    lines += [f"{name}: max abs diff {v['max_abs']:.3g}, max rel diff {v['max_rel']:.3g}"
              for name, v in result["outputs"].items()]
    return "\n".join(lines)
