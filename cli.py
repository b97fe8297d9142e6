"""detbench command line: parse options, call one library function, render the result.

Every command maps detbench's typed errors to exit codes (runtime.errors); nothing
below this file prints or exits.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from runtime.errors import ConfigError, DetbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Accuracy, parameters, operations and latency of object detectors, measured through ONNX.")
console = Console()
err_console = Console(stderr=True)


def reports_errors(fn):
    """Turn a DetbenchError into a red message on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DetbenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def parse_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    """``416`` or ``608x608`` (H x W) to (H, W)."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"--input-size {value!r}: expected N or HxW with positive integers, e.g. 416 or 600x850")
    return parts[0], parts[1]


@app.command("list")
@reports_errors
def list_models() -> None:
    """The registered models, and whether their weights are present locally."""
    from exporters.registry import load_registry
    from exporters.weights import locate_weights

    table = Table(title="detbench registry (models.toml)")
    for col in ("name", "framework", "input HxW", "resize", "labels", "paper", "weights"):
        table.add_column(col)
    for spec in load_registry():
        found = locate_weights(spec)
        if found is not None:
            weights = f"[green]present[/] {found}"
        elif spec.weights.public:
            weights = "[yellow]not fetched[/] (python cli.py fetch " + spec.name + ")"
        else:
            weights = "[dim]none published: random-init[/]"
        table.add_row(spec.name, spec.framework, f"{spec.height}x{spec.width}", spec.resize, spec.label_space,
                      "yes" if spec.paper else "", weights)
    console.print(table)


@app.command()
@reports_errors
def export(
    names: List[str] = typer.Argument(None, help="Registered model names (see `list`)."),
    all_models: bool = typer.Option(False, "--all", help="Export every registered model."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file (only with one model). "
                                           "Default: the fetched/located official weights, else random init."),
    out: Path = typer.Option(Path("results/onnx"), "--out", help="Output folder (or .onnx file for one model)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Override the registry's input size: N or HxW."),
    random_init: bool = typer.Option(False, "--random-init", help="Ignore available weights; deterministic random init."),
) -> None:
    """Export registered models to validated, self-describing ONNX files."""
    from exporters import default_output, export_model
    from exporters.registry import load_registry
    from exporters.weights import locate_weights

    registry = load_registry()
    if all_models and names:
        raise ConfigError("give model names or --all, not both")
    specs = registry.select(None if all_models else names)
    if not names and not all_models:
        raise ConfigError("name at least one model (see `python cli.py list`) or pass --all")
    if weights is not None and len(specs) != 1:
        raise ConfigError("--weights applies to exactly one model")
    size = parse_size(input_size)
    for spec in specs:
        target = out if (out.suffix == ".onnx" and len(specs) == 1) else default_output(spec, out, size)
        chosen = None if random_init else (weights or locate_weights(spec))
        with console.status(f"exporting {spec.name} ({'random-init' if chosen is None else chosen})") as status:
            result = export_model(spec, target, weights=chosen, input_size=size,
                                  progress=lambda msg: status.update(f"{spec.name}: {msg}"))
        label = "random-init weights" if result.contract.random_init else f"weights {result.contract.weights[:19]}…"
        console.print(f"[green]✓[/] {spec.name} -> {result.path} ({label}; exported and validated in {result.seconds:.1f} s)")


if __name__ == "__main__":
    app()
