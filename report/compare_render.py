"""A :class:`report.compare.Comparison` as rich tables for the console."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from report.compare import Comparison

_STYLE = {"slower": "bold red", "less accurate": "bold red", "faster": "green", "more accurate": "green",
          "unchanged": "", "not judged": "yellow", "not comparable": "yellow"}


def _styled(verdict: str) -> str:
    style = _STYLE.get(verdict, "")
    return f"[{style}]{verdict}[/]" if style else verdict


def _int(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _config(key) -> str:
    h, _, w = key.input_size.partition("x")
    return escape(f"{key.model} {h if h == w else key.input_size} {key.precision} {key.backend}")


def render(result: Comparison, console: Console) -> None:
    console.print(f"[bold]A[/] (reference) {escape(result.a)}\n[bold]B[/] {escape(result.b)}", highlight=False,
                  soft_wrap=True)
    latency_rows = [r for r in result.rows if r.latency is not None]
    if latency_rows:
        table = Table(title="latency, B against A (p50 = median of the raw samples)", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for col in ("configuration", "p50 ms A -> B", "B/A", "95 % CI", "p", "n A/B", "verdict"):
            table.add_column(col, justify="left" if col in ("configuration", "verdict") else "right",
                             no_wrap=col != "configuration")
        for row in latency_rows:
            lat = row.latency
            p = lat.p_faster if lat.verdict == "faster" else lat.p_slower
            table.add_row(_config(row.key),
                          f"{_ms(lat.median_a)} -> {_ms(lat.median_b)}",
                          "n/a" if lat.ratio is None else f"{lat.ratio:.3f}",
                          f"{lat.ci[0]:.2f}-{lat.ci[1]:.2f}" if lat.ci else "", "" if p is None else f"{p:.1g}",
                          f"{lat.n_a}/{lat.n_b}", _styled(lat.verdict))
        console.print(table)
    accuracy_rows = [r for r in result.rows if r.accuracy is not None]
    if accuracy_rows:
        table = Table(title="accuracy, B against A (COCO points, measured)", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for col in ("configuration", "mAP@0.5 A -> B", "mAP A -> B", "verdict"):
            table.add_column(col, justify="left" if col in ("configuration", "verdict") else "right",
                             no_wrap=col != "configuration")
        for row in accuracy_rows:
            acc = row.accuracy
            table.add_row(_config(row.key), f"{100 * acc.map50_a:.2f} -> {100 * acc.map50_b:.2f}",
                          f"{100 * acc.map_a:.2f} -> {100 * acc.map_b:.2f}", _styled(acc.verdict))
        console.print(table)
    if not result.rows:
        console.print("[yellow]no configuration (model, input size, precision, backend) has bench or eval records "
                      "in both stores[/]", highlight=False)
    for row in result.rows:
        lat = row.latency
        if lat is not None and lat.note:
            console.print(f"[yellow]{escape(str(row.key))}[/]: {escape(lat.note)}", highlight=False, soft_wrap=True)
        if lat is not None and lat.settings_changed:
            changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in lat.settings_changed.items())
            console.print(escape(f"{row.key}: bench settings differ: {changed}"), highlight=False, soft_wrap=True)
        if row.accuracy is not None and row.accuracy.note:
            console.print(escape(f"{row.key}: accuracy: {row.accuracy.note}"), highlight=False, soft_wrap=True)
        if row.size_changes:
            changed = ", ".join(f"{k} {_int(a)} -> {_int(b)}" for k, (a, b) in row.size_changes.items())
            console.print(escape(f"{row.key}: size changed: {changed}"), highlight=False, soft_wrap=True)
    for label, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
        if keys:
            console.print(f"[dim]{label}: {escape('; '.join(str(k) for k in keys))}[/]", highlight=False,
                          soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"[dim]method: {escape(result.method)}. p = the one-sided p-value of the verdict's direction; "
                  "mAP in COCO points (measured).[/]", highlight=False, soft_wrap=True)
    if result.regressions:
        console.print(f"[bold red]{len(result.regressions)} regression(s):[/]", highlight=False)
        for line in result.regressions:
            console.print(f"  [red]-[/] {escape(line)}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]no regression[/] (nothing slower or less accurate beyond the thresholds)",
                      highlight=False)
