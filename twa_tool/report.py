"""Render run reports for people: rich tables onto a Console the caller owns. Nothing else formats output."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.table import Table

METHOD_LABELS = {
    "last": "last checkpoint",
    "best": "best single checkpoint",
    "swa": "SWA (uniform mean + BN)",
    "twa": "TWA (trained coefficients + BN)",
}


def metrics_table(report: dict, title: str = "Evaluation split") -> Table:
    """Baselines and the result side by side, with the difference to SWA (or the best baseline)."""
    metrics = report["metrics"]
    reference_name = "swa" if "swa" in metrics else next((m for m in ("best", "last") if m in metrics), None)
    table = Table(title=title)
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    if reference_name:
        table.add_column(f"Δ acc vs {reference_name}", justify="right")
    for name, values in metrics.items():
        label = METHOD_LABELS.get(name, name)
        if "checkpoint" in values:
            label += f" [dim]({escape(values['checkpoint'])})[/dim]"
        row = [label, f"{100 * values['accuracy']:.2f}%", f"{values['loss']:.4f}"]
        if reference_name:
            delta = 100 * (values["accuracy"] - metrics[reference_name]["accuracy"])
            style = "green" if delta > 0 else "red" if delta < 0 else ""
            row.append(f"[{style}]{delta:+.2f}[/{style}]" if style else f"{delta:+.2f}")
        table.add_row(*row, style="bold" if name == "twa" else None)
    return table


def written_instead(report: dict) -> str | None:
    """The method written in TWA's place (``--on-worse fallback`` after a failed gate), or None when TWA was."""
    method = report.get("written_method", "twa")
    return None if method == "twa" else method


def method_label(report: dict, method: str) -> str:
    """``best single checkpoint (4.safetensors)``: a method's label, with its checkpoint when it is one."""
    values = report["metrics"].get(method, {})
    return METHOD_LABELS.get(method, method) + (f" ({values['checkpoint']})" if "checkpoint" in values else "")


def coefficients_table(report: dict, limit: int = 12) -> Table:
    """The learned coefficients a_i over the checkpoints (largest |a_i| first when there are many); beside them, the
    written model's own when a baseline was written instead of TWA (``--on-worse fallback``)."""
    instead = written_instead(report)
    own = report.get("written_coefficients", report["coefficients"])
    rows = list(zip(report["checkpoints"], report["coefficients"], own))
    # of many, the largest |a| of either column: a fallback's own coefficient (1 at the checkpoint written) is shown
    shown = rows if len(rows) <= limit else sorted(rows, key=lambda r: -max(abs(r[1]), abs(r[2])))[:limit]
    title = ("Coefficients w = Σ aᵢ wᵢ" if instead is None else "TWA's coefficients (not the written model's)") + \
        ("" if len(rows) <= limit else f" (largest {limit} of {len(rows)})")
    table = Table(title=title)
    table.add_column("checkpoint")
    table.add_column("a" if instead is None else "TWA a", justify="right")
    if instead is not None:
        table.add_column(f"written ({instead})", justify="right")
    dropped = set(report.get("dropped", []))
    for name, value, written in shown:
        cells = [escape(name) + (" [dim](dropped)[/dim]" if name in dropped else ""), f"{value:+.4f}"]
        table.add_row(*cells, *([f"{written:+.4f}"] if instead is not None else []))
    table.caption = f"Σ a = {sum(report['coefficients']):.4f}" + ("" if instead is None else " (TWA's)")
    return table


def gate_figures(gate: dict) -> tuple[str, str, str]:
    """TWA's and the baseline's accuracy and the tolerance of a quality gate, in percent, with as many decimals (2
    to 6) as it takes for numbers that differ to read differently: with 50,000 evaluation examples a failed gate at
    76.130% against 76.132% read "76.13% is below 76.13%", and a tolerance of 1e-5 read "0.00 points"."""
    twa, baseline, tolerance = (100 * gate[k] for k in ("twa_accuracy", "baseline_accuracy", "tolerance"))
    shortfall = baseline - twa

    def apart(a: float, b: float, digits: int) -> bool:
        return abs(a - b) < 1e-7 or round(a, digits) != round(b, digits)

    digits = next((d for d in range(2, 7) if apart(twa, baseline, d) and apart(shortfall, tolerance, d)
                   and apart(tolerance, 0.0, d)), 6)
    return f"{twa:.{digits}f}", f"{baseline:.{digits}f}", f"{tolerance:.{digits}f}"


def gate_verdict(gate: dict, markup: bool = True) -> str:
    """The quality gate's line in the console summary and report.md (``markup``: rich colours)."""
    _, _, tolerance = gate_figures(gate)
    passed = "passed" if gate["passed"] else "FAILED" if not markup else "failed"
    if markup:
        passed = f"[{'green' if gate['passed'] else 'red'}]{passed}[/]"
    return f"quality gate vs {gate['against']} (tolerance {tolerance} points): {passed}; wrote {gate['written']}"


def gate_failure(gate: dict, model_path: object) -> str:
    """The error line of a failed quality gate (exit 3)."""
    twa, baseline, tolerance = gate_figures(gate)
    return (f"quality gate failed: TWA accuracy {twa}% is below {gate['against']} {baseline}% (tolerance "
            f"{tolerance} points); wrote {gate['written']} to {model_path}")


def _print_plan(report: dict, console: Console, head: str, memory: str, data_line: str) -> None:
    """A dry run's plan: what it reads (``head``, what is left out), the model and its memory estimate, the data
    (or that it would be downloaded), the size of the model it would write and the files it would write."""
    console.print(head, soft_wrap=True, markup=False)
    for item in report["excluded"]:
        console.print(f"  left out {item['name']}: {item['reason']}", soft_wrap=True, markup=False)
    data = report["data"]
    console.print(f"model {report['model']['spec']}: {report['model']['parameters']:,} trainable parameters; "
                  f"peak memory about {memory}", soft_wrap=True, markup=False)
    if "threads" in report:  # the run's intra-op threads (per rank under torchrun): its time and CPU bytes follow
        console.print(f"threads {report['threads']} (torch's CPU threads, --threads)", markup=False)
    if data["would_download"]:
        into = f" into {data['download_into']}" if "download_into" in data else ""
        console.print(f"data {data['spec']}: not on disk; the run would download it{into} (--download)",
                      soft_wrap=True, markup=False)
    else:
        classes = f"{data['num_classes']} classes, " if data["num_classes"] is not None else ""  # None: file.py:fn
        console.print(f"data {data['spec']}: {classes}{data_line}; one went through the model", soft_wrap=True,
                      markup=False)
    if "output_bytes" in report:  # the written model's size, as --out-dtype makes it (--max-shard-size splits it)
        dtype = report.get("config", {}).get("out_dtype")
        console.print(f"output model: {size_text(report['output_bytes'])} of tensor data"
                      + (f" (--out-dtype {dtype})" if dtype else ""), markup=False)
    for path in report["would_write"]:
        console.print(f"would write {path}", soft_wrap=True, markup=False)
    console.print("nothing was written")


def unmeasured_data(data: dict) -> str:
    """What a dry run's memory figure leaves out: the data that ``--download`` would fetch was never loaded."""
    return " without the data (not on disk, so not loaded)" if data["would_download"] else ""


def size_text(count: int) -> str:
    """A size in bytes for people, in the largest unit that keeps it at least 1 (``120 bytes``, ``3.0 KiB``,
    ``681.9 MiB``, ``12.68 GiB``): a small model's parts read ``0.0 MiB`` in MiB alone, a large run ``12637.1 MiB``."""
    unit = next((u for u in range(3, 0, -1) if count >= 2 ** (10 * u)), 0)
    if not unit:
        return f"{count} bytes"
    return f"{count / 2 ** (10 * unit):.{2 if unit == 3 else 1}f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def render_dry_run(report: dict, console: Console) -> None:
    """The plan of a ``--dry-run``: selection, memory estimate, files that would be written."""
    memory, data = report["memory_estimate_bytes"], report["data"]
    parts = ", ".join(f"{k} {size_text(v)}" for k, v in memory.items() if k != "total")
    _print_plan(report, console,
                f"dry run: {len(report['checkpoints'])} checkpoints selected: {', '.join(report['checkpoints'])}",
                f"{size_text(memory['total'])} for the whole process{unmeasured_data(data)}, its parts summed "
                f"as if all were held at once ({parts}; torch_model_data: what this process holds now, torch, the "
                f"model and the data)",
                "" if data["would_download"] else
                f"{data['fit_examples']:,} examples to fit on ({data['fit_on']}), "
                f"{data['eval_examples']:,} to evaluate")


def render_soup_dry_run(report: dict, console: Console) -> None:
    """The plan of a ``twa soup --dry-run``: ingredients, memory estimate, files that would be written."""
    data, memory = report["data"], report["memory_estimate_bytes"]
    _print_plan(report, console,
                f"dry run: {len(report['ingredients'])} ingredients: {', '.join(report['ingredients'])}"
                + (f"; base {report['base']}" if report["base"] else ""),
                f"{size_text(memory['whole_process'])} for the whole process{unmeasured_data(data)}: "
                f"{size_text(memory['torch_model_data'])} that this process holds now (torch, the model, the "
                f"data) + {size_text(memory['total'])} beyond torch and the data ({memory['formula']})",
                "" if data["would_download"] else
                f"{data['fit_examples']:,} examples to fit on, {data['heldout_examples']:,} held out "
                f"({data['heldout']}), {data['eval_examples']:,} to evaluate")


def render_average(report: dict, console: Console) -> None:
    """Print the human summary of a ``twa average`` report."""
    console.print(metrics_table(report))
    console.print(coefficients_table(report))
    gate = report.get("quality_gate")
    if gate is not None:
        console.print(gate_verdict(gate), soft_wrap=True)
    basis = report["basis"]
    console.print(f"basis rank {basis['rank']} of {len(report['checkpoints'])}, "
                  f"max|PPᵀ-I| = {basis['orthonormality_error']:.1e}, "
                  f"distance to span = {basis['span_residual']:.1e}")
    print_written(report.get("outputs", {}), console)


def print_written(outputs: dict, console: Console) -> None:
    """One ``wrote PATH`` line per file a run wrote: the model's, the copied config/tokenizer files (a dry run
    lists them under ``would write``), report.json, report.md and figures."""
    if "model" in outputs:
        for item in [*outputs.get("files", [outputs["model"]]), *outputs.get("side_files", [])]:
            console.print(f"wrote {item['path']}  sha256 {item['sha256']}", soft_wrap=True, markup=False)
        console.print(f"wrote {outputs['report']['path']}", soft_wrap=True, markup=False)
    for path in outputs.get("human", []):  # report.md, figures
        console.print(f"wrote {path}", soft_wrap=True, markup=False)


def _epoch_step(row: dict) -> str:
    epoch = f"e{row['epoch']}" if row.get("epoch") is not None else ""
    step = f"s{row['step']}" if row.get("step") is not None else ""
    return " ".join(p for p in (epoch, step) if p) or "-"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def render_inspect(catalog: dict, console: Console) -> None:
    """One table: every candidate with what was detected, and whether `twa average` would use it."""
    table = Table(title=escape(str(catalog["directory"])))
    for column in ("#", "file", "producer", "container", "prefix", "weights", "dtype", "values", "epoch/step",
                   "metrics", "selection"):  # values: every tensor's, parameters and buffers (headers know no more)
        table.add_column(column, justify="right" if column in ("#", "values") else "left")
    rows = [(str(i), r) for i, r in enumerate(catalog["checkpoints"])] + [("", r) for r in catalog["not_selected"]]
    for index, row in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in row["metrics"].items()) or "-"
        status = "[green]selected[/green]" if row["status"] == "selected" else f"[dim]{row['status']}[/dim]"
        if row.get("error"):
            status = f"[red]{escape(row['error'])}[/red]"
        table.add_row(index, escape(row["name"]), row["producer"] or "-", row["container"] or "-",
                      escape(row.get("prefix") or "-"), row["weights"] or "-", ",".join(row["dtypes"]) or "-",
                      _count(row["tensor_values"]),
                      _epoch_step(row), metrics, status)
    console.print(table)
    console.print("values: every tensor value a file holds, parameters and buffers (twa average's D, its "
                  "report's model.parameters, counts the model's trainable parameters only)", markup=False,
                  style="dim")
    if catalog["ignored_files"]:
        console.print(f"ignored (not weights, never unpickled): {', '.join(catalog['ignored_files'])}", markup=False)
    for warning in catalog.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    console.print(f"{len(catalog['checkpoints'])} selected, {len(catalog['not_selected'])} left out")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~$])")


def md_text(text: object) -> str:
    """``text`` (a file name, a label) as literal Markdown inside a table cell: ``|`` would split the cell and
    ``*``/``_``/backticks turn into emphasis or code, so every such character is backslash-escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def md_code(text: object) -> str:
    """``text`` as a Markdown code span whose fence is longer than any run of backticks inside it."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_warnings(report: dict) -> list[str]:
    """report.md's list of the run's warnings (a file left out or counted once, a small held-out split, TWA
    below SWA...), as the run printed them; nothing when there are none."""
    warnings = report.get("warnings") or []
    return ["Warnings:", "", *(f"- {md_text(w)}" for w in warnings), ""] if warnings else []


def markdown_report(report: dict, images: list[str], note: str | None = None) -> str:
    """report.md: the baseline table, the coefficients and the figures, for people and CI artifact viewers."""
    metrics = report["metrics"]
    lines = ["# twa average report", "",
             f"{len(report['checkpoints'])} checkpoints, model {md_code(report['model']['spec'])}, "
             f"data {md_code(report['data']['spec'])} (fit on {report['data']['fit_on']}), "
             f"device {report['device']}.", "", *markdown_warnings(report),
             "| method | accuracy | loss |", "|---|---:|---:|"]
    for name, values in metrics.items():
        label = md_text(method_label(report, name))
        lines.append(f"| {label} | {100 * values['accuracy']:.2f}% | {values['loss']:.4f} |")
    gate = report.get("quality_gate")
    if gate is not None:
        verdict = gate_verdict(gate, markup=False)
        lines += ["", f"{verdict[0].upper()}{verdict[1:]}."]
    dropped = set(report.get("dropped", []))  # linearly dependent: left out of the basis, coefficient 0
    names = [f"{md_text(n)}{' (dropped)' if n in dropped else ''}" for n in report["checkpoints"]]
    instead = written_instead(report)
    if instead is None:
        lines += ["", "| checkpoint | coefficient |", "|---|---:|"]
        lines += [f"| {n} | {a:+.4f} |" for n, a in zip(names, report["coefficients"])]
        lines += ["", f"Σ a = {sum(report['coefficients']):.4f}"]
    else:  # --on-worse fallback: the file holds a baseline, whose coefficients are not TWA's
        lines += ["", f"**The written model is the {md_text(method_label(report, instead))}, not TWA's result.** "
                      f"The TWA column gives TWA's coefficients (not written); the written column the written "
                      f"model's own, over the same checkpoints (`written_coefficients` in report.json).", "",
                  f"| checkpoint | TWA coefficient | written ({instead}) |", "|---|---:|---:|"]
        lines += [f"| {n} | {a:+.4f} | {w:+.4f} |"
                  for n, a, w in zip(names, report["coefficients"], report["written_coefficients"])]
        lines += ["", f"Σ a (TWA's) = {sum(report['coefficients']):.4f}"]
    basis = report["basis"]
    lines += ["", f"Basis rank {basis['rank']}, max|PPᵀ−I| = {basis['orthonormality_error']:.1e}, distance of the "
                  f"result to the span {basis['span_residual']:.1e}."]
    frozen = report["model"].get("frozen") or []
    if frozen:
        start = report.get("train", {}).get("start", "mean")
        where = "the checkpoints' mean" if start == "mean" else md_text(start)
        listed = ", ".join(md_code(n) for n in frozen[:8]) + (f" and {len(frozen) - 8} more" if len(frozen) > 8 else "")
        lines += ["", f"{len(frozen)} frozen parameter tensor{'s' if len(frozen) != 1 else ''} (requires_grad=False) "
                      f"not trained, kept at the start point ({where}): {listed}."]
    lines += [""] + [f"![{name}]({name})" for name in images]
    if note:
        lines += ["", f"_{md_text(note)}_"]  # the note can quote an exception: `_ARRAY_API`
    return "\n".join(lines) + "\n"


SOUP_LABELS = {
    "best_single": "best single (on held-out)",
    "uniform": "uniform soup",
    "greedy": "greedy soup",
    "twa": "TWA soup (fitted coefficients)",
}


def _soup_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(key, label, metrics) for the summary rows: best single, uniform, greedy, twa."""
    metrics = report["metrics"]
    rows = []
    for key, label in SOUP_LABELS.items():
        detail = ""
        if key == "best_single":
            detail = f" ({metrics[key]['ingredient']})"
        elif key == "greedy":
            detail = f" ({len(report['greedy']['soup'])} of {len(report['ingredients'])})"
        elif key == "twa":
            detail = f" ({report['twa']['granularity']})"
        rows.append((key, label + detail, metrics[key]))
    return rows


def soup_table(report: dict) -> Table:
    """Every method and every ingredient on the held-out and eval splits."""
    table = Table(title="Soups and ingredients (BN re-estimated for each)")
    for column in ("model", "held-out acc", "held-out loss", "eval acc", "eval loss", "coefficient"):
        table.add_column(column, justify="left" if column == "model" else "right")
    written = report["written_method"]
    for key, label, values in _soup_rows(report):
        table.add_row(label + (" [green]← written[/green]" if key == written else ""),
                      f"{100 * values['heldout']['accuracy']:.2f}%", f"{values['heldout']['loss']:.4f}",
                      f"{100 * values['eval']['accuracy']:.2f}%", f"{values['eval']['loss']:.4f}", "",
                      style="bold" if key == written else None)
    table.add_section()
    greedy = set(report["greedy"]["soup"])
    for name, a in zip(report["ingredients"], report["coefficients"]["twa"]):
        values = report["metrics"]["ingredients"][name]
        table.add_row(escape(name) + (" [dim](in greedy)[/dim]" if name in greedy else ""),
                      f"{100 * values['heldout']['accuracy']:.2f}%", f"{values['heldout']['loss']:.4f}",
                      f"{100 * values['eval']['accuracy']:.2f}%", f"{values['eval']['loss']:.4f}", f"{a:+.4f}")
    table.caption = (f"coefficient: TWA's λ per {'task vector' if report['base'] else 'ingredient'}"
                     f"{' (numel-weighted mean over tensors)' if report['twa']['granularity'] == 'layer' else ''}")
    return table


def render_soup(report: dict, console: Console) -> None:
    """Print the human summary of a ``twa soup`` report."""
    console.print(soup_table(report))
    trace = report["greedy"]["trace"]
    steps = ", ".join(f"{s['candidate']} {100 * s['heldout_accuracy']:.2f}% {'✓' if s['accepted'] else '✗'}"
                      for s in trace[1:])
    console.print(f"greedy: start {trace[0]['candidate']} ({100 * trace[0]['heldout_accuracy']:.2f}%); {steps}",
                  soft_wrap=True, markup=False)
    memory = report["memory"]
    console.print(f"written: {report['written_method']} (chosen by {report['chosen_by']}); directions "
                  f"{size_text(memory['directions_bytes'])} ({memory['basis_dtype']}), peak RSS "
                  f"{size_text(memory['peak_rss_bytes'])}", soft_wrap=True, markup=False)
    print_written(report.get("outputs", {}), console)


def markdown_soup_report(report: dict) -> str:
    """report.md of ``twa soup``: methods and ingredients side by side, the greedy trace, the coefficients."""
    data = report["data"]
    lines = ["# twa soup report", "",
             f"{len(report['ingredients'])} ingredients, model {md_code(report['model']['spec'])}, "
             f"data {md_code(data['spec'])} "
             f"(held-out: {data['heldout']}, {data['heldout_examples']} examples; eval {data['eval_examples']}), "
             f"device {report['device']}. Written: **{report['written_method']}** (chosen by "
             f"{report['chosen_by']}).", "", *markdown_warnings(report)]
    lines += ["| model | held-out acc | held-out loss | eval acc | eval loss |", "|---|---:|---:|---:|---:|"]

    def row(label: str, values: dict) -> str:
        return (f"| {label} | {100 * values['heldout']['accuracy']:.2f}% | {values['heldout']['loss']:.4f} | "
                f"{100 * values['eval']['accuracy']:.2f}% | {values['eval']['loss']:.4f} |")

    lines += [row(md_text(label), values) for _, label, values in _soup_rows(report)]
    lines += [row(md_text(name), report["metrics"]["ingredients"][name]) for name in report["ingredients"]]
    lines += ["", "Greedy soup (ranked by held-out accuracy; a candidate joins only if the soup's held-out accuracy "
                  "strictly improves):", "", "| candidate | held-out acc of soup + candidate | accepted |",
              "|---|---:|---|"]
    lines += [f"| {md_text(s['candidate'])} | {100 * s['heldout_accuracy']:.2f}% | {'yes' if s['accepted'] else 'no'} |"
              for s in report["greedy"]["trace"]]
    of = "task vector" if report["base"] else "ingredient"
    lines += ["", f"Coefficients per {of} (TWA granularity {report['twa']['granularity']}):", "",
              "| " + of + " | uniform | greedy | twa |", "|---|---:|---:|---:|"]
    c = report["coefficients"]
    lines += [f"| {md_text(n)} | {u:.4f} | {g:.4f} | {t:+.4f} |"
              for n, u, g, t in zip(report["ingredients"], c["uniform"], c["greedy"], c["twa"])]
    if report["twa"]["granularity"] == "layer":
        lines += ["", "With layer granularity the twa column is each ingredient's λ averaged over the tensors, "
                      "weighted by their sizes: a summary. The exact mix is `twa.by_tensor` in report.json."]
    frozen = report["model"].get("frozen") or []
    if frozen:
        names = ", ".join(md_code(n) for n in frozen[:8]) + (f" and {len(frozen) - 8} more" if len(frozen) > 8 else "")
        lines += ["", f"{len(frozen)} frozen parameter tensor{'s' if len(frozen) != 1 else ''} (requires_grad=False) "
                      f"not mixed by λ: the twa soup keeps the uniform soup's values: {names}."]
    return "\n".join(lines) + "\n"
