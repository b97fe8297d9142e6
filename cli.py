"""detbench command line: parse options, call one library function, render the result.

Every command maps detbench's typed errors to exit codes (core.errors); nothing
below this file prints or exits.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.contract import check_file
from core.errors import ConfigError, DetbenchError, WeightsError

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
            print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # Almost always a path given on the command line (--out, --csv, --json) that cannot be
            # written or read as asked; the library names its own files in DetbenchErrors.
            where = f" {exc.filename}" if exc.filename else ""
            print_error(f"cannot use{where}: {exc.strerror or exc} (check the path given on the command line)")
            raise typer.Exit(ConfigError.exit_code) from None

    return wrapper


def print_error(exc, label: str = "error:") -> None:
    # Messages carry paths, cfg lines and names the user chose: never rich markup.
    err_console.print(f"[bold red]{label}[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def t(value) -> str:
    """``value`` as text for a rich markup string or table cell (brackets shown as typed)."""
    return escape(str(value))


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
    """The registered models, and whether their weights are present locally, fetchable or not published."""
    from rich import box

    from exporters import batch_support
    from exporters.registry import load_registry
    from exporters.weights import weights_status

    registry = load_registry()
    # Short cells so that the table fits an 80-column console; paths go below the table.
    table = Table(title=f"detbench registry ({t(registry.path.name)})", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, padding=(0, 1), collapse_padding=True, title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("framework", "input", "resize", "labels"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    table.add_column("B", no_wrap=True)
    table.add_column("weights", no_wrap=True, overflow="ellipsis", min_width=12)  # last: scripts read the state off the line's end
    present: dict[Path, list[str]] = {}
    no_batch: dict[str, str] = {}  # framework -> why its exporter cannot write a batch file
    damaged = []  # statuses with copies that failed their sha256 (whether or not another copy is used)
    for spec in registry:
        status = weights_status(spec)
        if status.rejected:
            damaged.append(status)
        if status.state == "present":
            present.setdefault(status.path, []).append(spec.name)
            cell = "[green]present[/]"
        elif status.state == "fetchable":
            cell = "[yellow]fetchable[/]"
        elif status.state == "none":
            cell = "[dim]random-init[/]"
        elif status.state == "corrupt":
            cell = "[red]corrupt[/]"
        batchable, why = batch_support(spec)
        if not batchable:
            no_batch.setdefault(spec.framework, why)
        table.add_row(t(spec.name) + (" *" if spec.paper else ""), t(spec.framework),
                      f"{spec.height}x{spec.width}", t(spec.resize), t(spec.label_space),
                      "yes" if batchable else "-", cell)
    console.print(table)
    console.print("* one of the paper's eleven configurations (Sheik, Chaurasia, Culurciello 2018).\n"
                  "weights: [green]present[/] = found locally (below); [yellow]fetchable[/] = official "
                  "weights not here yet, `python cli.py fetch NAME` (or --all); [dim]random-init[/] = "
                  "none published, exports use deterministic random weights (counts and latency "
                  "valid, accuracy not); [red]corrupt[/] = the only local copy fails its sha256 "
                  "(below).\nB: `export NAME --batch` writes NAME@batch.onnx (symbolic batch axis, per-image NMS, "
                  "output batch_index) for Offline's batch search; '-': batch 1 only.", highlight=False)
    for framework, why in no_batch.items():
        console.print(f"  {t(framework)}: {t(why)}", highlight=False)  # wrapped to the console like the rest
    if present:
        console.print("present locally:", highlight=False)
        for path, names in present.items():
            console.print(f"  {', '.join(names)}:", highlight=False, markup=False)
            console.print(f"    {path}", highlight=False, soft_wrap=True, markup=False)  # never broken: copy-pastable
    for status in damaged:
        label = "[red]corrupt[/]" if status.state == "corrupt" else "[yellow]ignored[/]"
        console.print(f"{label} {t(status.problem)}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def export(
    names: List[str] = typer.Argument(None, help="Registered model names (see `list`)."),
    all_models: bool = typer.Option(False, "--all", help="Export every registered model."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file (only with one model). "
                                           "Default: the fetched/located official weights, else random init."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (or .onnx file for one model). "
                                       "Default: <results dir>/onnx ($DETBENCH_RESULTS, else results/)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Override the registry's input size: N or HxW."),
    random_init: bool = typer.Option(False, "--random-init", help="Ignore available weights; deterministic random init."),
    saved_model: Optional[Path] = typer.Option(None, "--saved-model", help="Convert this TensorFlow SavedModel folder "
                                               "instead of registered models (needs --describe)."),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help="Wrap this foreign ONNX detector into a contract "
                                             "file instead of exporting registered models (needs --describe)."),
    describe: Optional[Path] = typer.Option(None, "--describe", help="TOML file mapping the SavedModel's or ONNX file's "
                                            "inputs and outputs onto the contract (formats: exporters/tensorflow/saved_model.py, "
                                            "exporters/foreign/describe.py)."),
    accept_mismatch: bool = typer.Option(False, "--accept-mismatch", help="PyTorch models: write the file even "
                                         "if onnxruntime's detections differ from PyTorch's beyond every "
                                         "explained boundary; it is marked detbench.validation = failed-accepted "
                                         "with the mismatches in its metadata (never for NaN/Inf outputs)."),
    batch: bool = typer.Option(False, "--batch", help="Write NAME@batch.onnx: a symbolic batch axis N, NMS per "
                               "image, an extra output batch_index (int64 per detection), metadata detbench.batch = "
                               "symbolic; validated image by image against batch 1 (Darknet models; `list` column B)."),
) -> None:
    """Export registered models (or a TensorFlow SavedModel, or wrap a foreign ONNX detector) to validated,
    self-describing ONNX files."""
    from exporters import default_output, export_model
    from exporters.registry import load_registry
    from exporters.weights import locate_weights
    from core.paths import results_dir

    out = out if out is not None else results_dir() / "onnx"
    if onnx_file is not None:
        from exporters.foreign.wrap import wrap_onnx

        if names or all_models or weights is not None or input_size is not None or random_init or saved_model or batch:
            raise ConfigError("--onnx wraps one ONNX file: give it with --describe, not with model names/--all/"
                              "--weights/--input-size/--random-init/--saved-model/--batch (the size is the describe "
                              "file's; a wrapped file is batch 1)")
        if describe is None:
            raise ConfigError("--onnx FILE needs --describe FILE.toml (format: exporters/foreign/describe.py)")
        with console.status(f"wrapping {t(onnx_file)}") as status:
            result = wrap_onnx(onnx_file, describe, out, progress=lambda msg: status.update(t(msg)))
        console.print(f"[green]✓[/] {t(result.contract.name)} -> {t(result.path)} (ONNX {t(onnx_file)}; "
                      f"wrapped and validated in {result.seconds:.1f} s)", highlight=False, soft_wrap=True)
        _render_warnings(result)
        return
    if saved_model is not None or describe is not None:
        from exporters.tensorflow.saved_model import export_saved_model

        if names or all_models or weights is not None or input_size is not None or random_init or batch:
            raise ConfigError("--saved-model converts one SavedModel: give it with --describe, not both it and "
                              "model names/--all/--weights/--input-size/--random-init/--batch")
        if saved_model is None or describe is None:
            raise ConfigError("--saved-model DIR and --describe FILE go together")
        with console.status(f"converting {t(saved_model)}") as status:
            result = export_saved_model(saved_model, describe, out, progress=lambda msg: status.update(t(msg)))
        console.print(f"[green]✓[/] {t(result.contract.name)} -> {t(result.path)} (SavedModel {t(saved_model)}; "
                      f"exported and validated in {result.seconds:.1f} s)", highlight=False, soft_wrap=True)
        _render_warnings(result)
        return
    registry = load_registry()
    if all_models and names:
        raise ConfigError("give model names or --all, not both")
    specs = registry.select(None if all_models else names)
    if not names and not all_models:
        raise ConfigError("name at least one model (see `python cli.py list`) or pass --all")
    if weights is not None and len(specs) != 1:
        raise ConfigError("--weights applies to exactly one model")
    if weights is not None and weights.is_dir():
        raise WeightsError(f"--weights {weights} is a directory, not a weights file: pass the file itself")
    if weights is not None and not weights.is_file():
        raise WeightsError(f"--weights {weights}: no such file (check the path; `python cli.py list` shows "
                           "the weights found locally)")
    size = parse_size(input_size)
    if batch:  # every refusal before the first export starts
        from exporters import batch_support

        refused = {spec.name: batch_support(spec)[1] for spec in specs if not batch_support(spec)[0]}
        if refused and not all_models:
            name, why = next(iter(refused.items()))
            raise ConfigError(f"export {name} --batch: {why}; export it without --batch (batch 1)")
        for name in refused:  # --all --batch: the models whose exporter can, the others named
            console.print(f"[yellow]no batch export[/] {t(name)}: {t(refused[name])}", highlight=False,
                          soft_wrap=True)
        specs = [spec for spec in specs if spec.name not in refused]
    for spec in specs:
        target = out if (out.suffix == ".onnx" and len(specs) == 1) else default_output(spec, out, size, batch)
        chosen = None if random_init else (weights or locate_weights(spec))
        with console.status(f"exporting {t(spec.name)} ({'random-init' if chosen is None else t(chosen)})") as status:
            result = export_model(spec, target, weights=chosen, input_size=size, accept_mismatch=accept_mismatch,
                                  batch=batch, progress=lambda msg: status.update(t(f"{spec.name}: {msg}")))
        label = "random-init weights" if result.contract.random_init else f"weights {result.contract.weights[:19]}…"
        if result.validation.get("status") == "failed-accepted":
            console.print(f"[yellow]![/] {t(spec.name)} -> {t(result.path)} ({label}; validation FAILED and was "
                          f"accepted (--accept-mismatch), recorded in the file's metadata):", highlight=False,
                          soft_wrap=True)
            for mismatch in result.validation["mismatches"]:
                console.print(f"  - {t(mismatch)}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[green]✓[/] {t(spec.name)} -> {t(result.path)} ({label}; exported and validated in "
                          f"{result.seconds:.1f} s)", highlight=False, soft_wrap=True)
        _render_warnings(result)


def _render_warnings(result) -> None:
    for warning in getattr(result, "warnings", ()):
        console.print(f"[yellow]warning:[/] {t(warning)}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def quantize(
    model: Path = typer.Argument(..., help="Exported float32 ONNX detector."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="COCO folder (or folder of images) to "
                                               "calibrate on. Default: the shared COCO val2017 subset."),
    images: int = typer.Option(32, "--images", help="Calibration images: the first N by COCO image id."),
    method: str = typer.Option("entropy", "--method", help="Calibration: entropy (KL, 2048-bin histograms; slowest, "
                               "most accurate here), minmax (fastest) or percentile."),
    per_channel: bool = typer.Option(True, "--per-channel/--no-per-channel", help="One weight scale per output channel."),
    quant_format: str = typer.Option("qdq", "--format", help="qdq (Quantize/DequantizeLinear pairs) or qoperator."),
    out: Optional[Path] = typer.Option(None, "--out", help="INT8 file to write. Default: <model folder>/<stem>@int8.onnx."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Accuracy budget in mAP points (mAP@0.5 and "
                                             "mAP@[.5:.95] alike, selection images): the most sensitive layers per "
                                             "MAC stay float until the 95% paired bootstrap interval of the change "
                                             "reaches -budget (no loss beyond the budget shown). Needs trained "
                                             "weights and COCO data (--calibration, split 16/32/rest by --seed)."),
    seed: int = typer.Option(0, "--seed", help="With --max-drop: the seed of the calibration/selection/evaluation split."),
) -> None:
    """Static INT8 quantization (onnxruntime) calibrated on COCO images; NMS and box decoding stay float.

    The calibration (and, with --max-drop, selection) image ids are recorded in the file: `eval` refuses to score
    the model on them.
    """
    from quantization.quantize import QuantizeSettings, quantize_model

    settings = QuantizeSettings(calibration=calibration, images=images, method=method, per_channel=per_channel,
                                format=quant_format, out=out)
    try:
        with console.status(f"quantizing {t(model)}") as status:
            if max_drop is not None:
                from quantization.budget import BudgetSettings, check_budget, quantize_within_budget

                budget = BudgetSettings(max_drop=check_budget(max_drop), coco_dir=calibration, seed=seed,
                                        quantize=settings)
                outcome = quantize_within_budget(model, budget, progress=lambda msg: status.update(t(msg)))
            else:
                result = quantize_model(model, settings, progress=lambda msg: status.update(t(msg)))
    except KeyboardInterrupt:
        print_error("interrupted: nothing was written (the INT8 file is written in one step at the end)")
        raise typer.Exit(130) from None
    if max_drop is not None:
        from quantization.budget import RULE

        kept = ", ".join(outcome.kept_float) or "none"
        changes = "; ".join(c.describe() for c in outcome.changes.values())
        console.print(f"[green]✓[/] {t(model)} -> {t(outcome.path)}: {outcome.split.describe()}; selection change "
                      f"INT8 - float32: {t(changes)} (budget {max_drop}: {t(RULE)}; all INT8 drop "
                      f"{outcome.all_int8_drop:.2f}); layers kept float for accuracy: {t(kept)}. "
                      f"Evaluate on the other images: eval refuses calibration and selection ids.",
                      highlight=False, soft_wrap=True)
        return
    ids = result.calibration_ids
    shown = ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")
    console.print(f"[green]✓[/] {t(result.contract.name)} -> {t(result.path)} in {result.seconds:.1f} s: "
                  f"{len(result.quantized_nodes)} node(s) int8 ({result.activation_type} activations, "
                  f"{result.weight_type} weights), {len(result.float_nodes)} kept float; calibrated ({t(method)}) on "
                  f"{len(result.calibration_files)} image(s), ids {t(shown)}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def tune(
    model: Path = typer.Argument(..., help="Exported float32 ONNX detector."),
    max_drop: float = typer.Option(..., "--max-drop", help="Accuracy budget in mAP points (mAP@0.5 and mAP@[.5:.95] "
                                   "against onnxruntime CPU float32, selection images; within it when the 95% paired "
                                   "bootstrap interval of the change reaches -budget)."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO folder. Default: the shared COCO val2017 subset."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration/selection/evaluation split."),
    providers: Optional[List[str]] = typer.Option(None, "--provider", "-p", help="Backends to try (default: every "
                                                  "backend that runs here)."),
    threads: Optional[List[int]] = typer.Option(None, "--threads", help="Thread settings to try (default: 1 .. cores)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Timed seconds per configuration (default: until "
                                            "the p50 is VALID, as bench)."),
    int8: Optional[Path] = typer.Option(None, "--int8", help="Use this INT8 file (made by quantize --max-drop) "
                                        "instead of quantizing."),
) -> None:
    """Fastest backend x precision x threads within an accuracy budget, with the Pareto table (latency vs drop)."""
    from rich.table import Table

    from quantization.tune import TuneSettings
    from quantization.tune import tune as run_tune

    settings = TuneSettings(max_drop=max_drop, coco_dir=coco, seed=seed, backends=tuple(providers or ()) or None,
                            threads=tuple(threads or ()) or None, bench_seconds=seconds, int8=int8)
    with console.status(f"tuning {t(model)}") as status:
        result = run_tune(model, settings, progress=lambda msg: status.update(t(msg)))
    table = Table(title=f"tune {t(model)}: p50 latency vs accuracy drop (points, selection images)")
    for column in ("backend", "precision", "threads", "p50 ms", "valid", "mAP@0.5", "mAP@[.5:.95]",
                   "change 0.5 / .5:.95 [95%]", "drop", "within budget", "Pareto"):
        table.add_column(column)
    for p in sorted(result.points, key=lambda p: p.p50_ms):
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        change = "-" if not p.changes else " / ".join(
            f"{c['delta']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" for c in (p.changes["map50"], p.changes["map"]))
        table.add_row(t(p.backend), p.precision, str(p.threads), f"{p.p50_ms:.1f}", "VALID" if p.valid else "INVALID",
                      fmt(p.map50), fmt(p.map), change, fmt(p.drop),
                      "-" if p.within_budget is None else ("yes" if p.within_budget else "no"),
                      "*" if p.pareto else "")
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]-[/] {t(note)}", highlight=False, soft_wrap=True)
    if result.chosen is None:
        console.print(f"[yellow]no configuration is within --max-drop {max_drop}[/]")
        return
    what = "within the budget" if result.accuracy_measured else "(speed only: accuracy not measured)"
    ratio = f", {result.speedup:.2f}x onnxruntime CPU float32 ({result.reference.threads} threads)" \
        if result.speedup else ""
    console.print(f"[green]✓[/] fastest {what}: {t(result.chosen.label)} p50 {result.chosen.p50_ms:.1f} ms"
                  f"{ratio}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def fetch(
    names: List[str] = typer.Argument(None, help="Registered model names (see `list`)."),
    all_models: bool = typer.Option(False, "--all", help="Fetch the files of every registered model."),
    cache: Optional[Path] = typer.Option(None, "--cache-dir", help="Download folder. Default: $DETBENCH_CACHE, "
                                         "else ~/.cache/detbench (where `export` and `list` look)."),
    allow_unverified: bool = typer.Option(False, "--allow-unverified", help="Also download files for which "
                                          "models.toml has no sha256; the computed sha256 is recorded beside them."),
) -> None:
    """Download official weights (and Darknet cfgs) into the cache, verified by sha256 before use."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from exporters.registry import load_registry
    from exporters.weights import UNVERIFIED, VERIFIED_PREFIX
    from exporters.weights import fetch as fetch_files
    from core.errors import FetchError

    if all_models and names:
        raise ConfigError("give model names or --all, not both")
    if not names and not all_models:
        raise ConfigError("name at least one model (see `python cli.py list`) or pass --all")
    specs = load_registry().select(None if all_models else names)
    failed: list[str] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}

        def progress(file_name: str, done: int, total: Optional[int]) -> None:
            if file_name not in tasks:
                tasks[file_name] = bars.add_task(file_name, total=total)
            bars.update(tasks[file_name], completed=done, total=total)

        for spec in specs:
            try:
                outcome = fetch_files(spec, cache=cache, allow_unverified=allow_unverified, progress=progress)
            except FetchError as exc:
                if len(specs) == 1:
                    raise
                failed.append(spec.name)
                print_error(exc)
                continue
            for item in outcome.files:
                action = "downloaded to" if item.downloaded else "present at"
                if item.replaced:
                    console.print(f"[yellow]![/] {t(spec.name)} {item.kind}: {t(item.replaced)}", highlight=False,
                                  soft_wrap=True)
                if item.verified == UNVERIFIED:
                    console.print(f"[yellow]![/] {t(spec.name)} {item.kind} {action} {t(item.path)} ({item.size:,} bytes): "
                                  f"NOT verified (models.toml has no sha256); computed sha256 {item.sha256} "
                                  f"recorded in {t(item.sidecar)}", highlight=False, soft_wrap=True)
                elif item.verified == VERIFIED_PREFIX:
                    console.print(f"[green]✓[/] {t(spec.name)} {item.kind} {action} {t(item.path)} ({item.size:,} bytes): "
                                  f"only the published sha256 prefix {item.prefix} was verified "
                                  f"(full sha256 {item.sha256})", highlight=False, soft_wrap=True)
                else:
                    console.print(f"[green]✓[/] {t(spec.name)} {item.kind} {action} {t(item.path)} ({item.size:,} bytes): "
                                  f"sha256 verified ({item.sha256})", highlight=False, soft_wrap=True)
            if outcome.note:
                console.print(f"[dim]-[/] {t(outcome.note)}", highlight=False, soft_wrap=True)
    if failed:
        raise FetchError(f"{len(failed)} of {len(specs)} model(s) could not be fetched: {', '.join(failed)} "
                         "(errors above)")


@app.command("backends")
@reports_errors
def backends_command(
    setup: Optional[str] = typer.Option(None, "--setup", help="Prepare what this backend needs beyond the installed "
                                         "packages, then list the backends: litert's converter venv (onnx2tf and its "
                                         "pins, from the package registry: about 2.6 GB, minutes)."),
) -> None:
    """Every backend name --provider accepts, whether it runs here, and why not."""
    from report.console import render_backends
    from runtime.backends import get_backend, list_backends

    if setup is not None:
        with console.status(t(f"{setup}: setting up")) as status:
            made = get_backend(setup).setup(progress=lambda msg: status.update(t(msg)))
        console.print(f"[green]✓[/] {t(setup)}: " + ", ".join(f"{k} {t(v)}" for k, v in made.items()),
                      highlight=False, soft_wrap=True)
    render_backends(console, [(b.name, b.description, *b.probe()) for b in list_backends()])


@app.command()
@reports_errors
def bench(
    models: List[Path] = typer.Argument(..., help="Exported ONNX files (see `export`)."),
    providers: List[str] = typer.Option(["cpu"], "--provider", "-p", help="Backend (repeatable; see `backends`): "
                                        "cpu, openvino, openvino-bf16, native, cuda, tensorrt, ort-openvino, ... "
                                        "Several are measured side by side, alternating."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
    rounds: int = typer.Option(5, "--rounds", help="Timed runs are split into this many rounds; each round runs "
                               "every backend, their order rotating."),
    parity: bool = typer.Option(True, "--parity/--no-parity", help="Compare each backend's detections with "
                                "onnxruntime CPU's on 3 COCO images before timing it."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs per backend. Default (neither --runs nor "
                                       "--seconds): as many as a VALID p50 and p90 need — at least 64 runs and 10 s "
                                       "per backend, whichever is later, stopping at 60 s per backend (then "
                                       "INVALID, capped)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Time as many runs as start within S seconds."),
    batch: int = typer.Option(1, "--batch", help="Images per run. detbench's graphs are batch-1 (boxes [K, 4] "
                              "carry no image index): B > 1 is refused unless the graph's batch is symbolic."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (onnxruntime, the native "
                                          "framework and the peak measurement alike). Default: onnxruntime's."),
    inter_threads: Optional[int] = typer.Option(None, "--inter-threads", help="Inter-op threads (parallel mode)."),
    optimization: str = typer.Option("all", "--optimization", help="Graph optimisation: disable, basic, "
                                     "extended, layout, all."),
    execution_mode: str = typer.Option("sequential", "--execution-mode", help="sequential or parallel."),
    provider_option: List[str] = typer.Option([], "--provider-option", help="KEY=VALUE for the provider "
                                              "(repeatable), e.g. device_id=0."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Measure even if onnxruntime replaces the "
                                        "provider (the result records what actually ran)."),
    trt_cache_dir: Optional[Path] = typer.Option(None, "--trt-cache-dir", help="TensorRT engine cache folder."),
    include_copies: bool = typer.Option(False, "--include-copies", help="CUDA/TensorRT: time host<->device copies "
                                        "too (default: inputs bound on the device with IO binding)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image. Default: the COCO val2017 image of "
                                         "the shared subset with the most objects."),
    native: bool = typer.Option(False, "--native", help="Shortcut for -p native: also time the source framework "
                                "(PyTorch eager, TensorFlow, OpenCV DNN for Darknet) side by side."),
    native_weights: Optional[Path] = typer.Option(None, "--native-weights", help="Weights for --native of a "
                                                  "trained export when not found locally (one model)."),
    nodes: bool = typer.Option(False, "--nodes", help="Per-node profile: time, share and achieved GMAC/s."),
    top: int = typer.Option(15, "--top", help="Kernels listed by --nodes."),
    peak: bool = typer.Option(True, "--peak/--no-peak", help="Measure the machine's matmul peak and state each "
                              "result's fraction of it."),
    scenario: str = typer.Option("single-stream", "--scenario", help="MLPerf scenario: single-stream (latency, "
                                 "one image at a time), offline (max images/s over streams x threads x batch), "
                                 "server (highest Poisson QPS with p99 under --p99-ms)."),
    p99_ms: Optional[float] = typer.Option(None, "--p99-ms", help="Server: the p99 latency bound in ms. Default: "
                                           "10 x the model's SingleStream p50 on that backend."),
    streams: Optional[int] = typer.Option(None, "--streams", help="Offline/server: concurrent streams (sessions or "
                                          "OpenVINO infer requests). Default: search 1, 2, 4, ... up to the cores."),
    threads_per_stream: Optional[int] = typer.Option(None, "--threads-per-stream", help="Offline/server: intra-op "
                                                     "threads per stream. Default: the cores split between streams."),
    seed: int = typer.Option(0, "--seed", help="Server: seed of the Poisson arrival schedule (recorded)."),
) -> None:
    """Latency per backend, side by side, with parity against onnxruntime CPU; recorded in the results store."""
    from report.console import render_bench, render_scenarios
    from runtime.backends import BackendSettings
    from runtime.bench import BenchSettings
    from runtime.scenarios import SINGLE_STREAM, ScenarioSettings, bench_scenario

    for path in models:
        check_file(path)  # the contract itself is checked by bench before any session is made

    options: dict[str, str] = {}
    for item in provider_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--provider-option {item!r}: expected KEY=VALUE, e.g. device_id=0")
        options[key.strip()] = value.strip()
    if native_weights is not None and len(models) != 1:
        raise ConfigError("--native-weights applies to exactly one model")
    with console.status("benchmarking (the machine is measured as it is: other load shows in the figures)"):
        timing = BenchSettings(warmup=warmup, runs=runs, seconds=seconds, rounds=rounds, batch=batch, image=image,
                               nodes=nodes, peak=peak, parity=parity)
        opening = BackendSettings(threads=threads, inter_threads=inter_threads, optimization=optimization,
                                  execution_mode=execution_mode, provider_options=options,
                                  allow_fallback=allow_fallback, trt_cache_dir=trt_cache_dir,
                                  include_copies=include_copies, native_weights=native_weights)
        backends = list(dict.fromkeys(list(providers) + (["native"] if native else [])))
        chosen = ScenarioSettings(scenario=scenario, p99_ms=p99_ms, streams=streams,
                                  threads_per_stream=threads_per_stream, seed=seed)
        results = bench_scenario(list(models), backends, chosen, timing, opening)
    if chosen.scenario == SINGLE_STREAM:
        render_bench(console, results, top)
    else:
        render_scenarios(console, results)


@app.command()
@reports_errors
def run(
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated registered names, or `all` for the "
                                         "whole registry (default: the paper's eleven configurations; the other "
                                         "models are cross-checks)."),
    quick: bool = typer.Option(False, "--quick", help="Bounded smoke run: 1 warm-up + 3 timed bench runs per "
                               "backend, 2 images per model for the per-image step, 8 COCO images per eval, "
                               "4 calibration images (results are marked smoke, not valid)."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO folder (annotations/instances_val2017.json, val2017/). "
                                        "Default: $DETBENCH_DATA/coco-val2017-subset when it exists."),
    providers: Optional[List[str]] = typer.Option(None, "--provider", "-p", help="Backends to bench (repeat; see "
                                                  "`python cli.py backends`). Default: cpu, every other provider "
                                                  "onnxruntime lists, openvino and openvino-bf16, each probed first."),
    budget: Optional[float] = typer.Option(None, "--budget", min=0.1, help="Minutes of bench timing for the whole "
                                           "run (default 7; each model's first opening is extra): every model x backend pair "
                                           "first gets 11 runs and 1 s, then unstable pairs more runs until a VALID "
                                           "p50 (median's 95 % interval within 5 %), then the rest buys VALID p90s "
                                           "(64 runs, 10 s), cheapest first. "
                                           "A second run with a larger budget continues from the first one's runs."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads of bench, the per-image "
                                          "step and evaluation (local and --ray actors); default: this machine's "
                                          "CPUs. Every record states the count."),
    bench_runs: Optional[int] = typer.Option(None, "--bench-runs", min=1, help="Instead of --budget: timed bench runs "
                                             "per model x backend, each row on its own."),
    bench_seconds: Optional[float] = typer.Option(None, "--bench-seconds", min=0.1, help="Instead of --budget: timed "
                                                  "seconds per model x backend, each row on its own (short runs are "
                                                  "recorded INVALID for the figures they cannot support)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1, help="Evaluate at most N COCO images per model."),
    int8: Optional[str] = typer.Option(None, "--int8", help="Models that get an INT8 row (NAME@int8): "
                                       "comma-separated names, `all` or `none`. Default: yolov3-tiny, ssd300 "
                                       "(the others quantize too, behind --int8 all: longer)."),
    sizes: bool = typer.Option(True, "--sizes/--no-sizes", help="Also the further input sizes models.toml lists "
                               "under run_sizes (yolov3-tiny at 320, 512, 608)."),
    per_image: Optional[int] = typer.Option(None, "--per-image", min=0, help="COCO images per model for the "
                                            "per-image operations/latency step (default 2, at most 8 s a model; "
                                            "0 turns it off)."),
    onnx_files: List[Path] = typer.Option([], "--onnx", help="A foreign ONNX detector to add to the run (repeatable; "
                                           "each with a --describe file, in the same order; see `export --onnx`)."),
    describe: List[Path] = typer.Option([], "--describe", help="The describe TOML of each --onnx file."),
    no_report: bool = typer.Option(False, "--no-report", help="Measure only; do not write the report."),
    scenarios: Optional[str] = typer.Option(None, "--scenarios", help="Offline/Server measurements after the "
                                            "SingleStream timing (report: throughput and QPS-at-p99 tables): "
                                            "comma-separated model names and/or scenario names (offline, server), "
                                            "`all` (every model of the run, both) or `none`. Default: yolov3-tiny, "
                                            "Offline on cpu and openvino-bf16 (openvino without bf16) and Server "
                                            "on cpu (about 1 minute; --quick: none)."),
    server_backends: Optional[str] = typer.Option(None, "--server-backends", help="Backends of the Server scenario "
                                                  "(comma-separated, or `all`: the Offline ones; a|b: the first of them "
                                                  "that runs here). Default: cpu."),
    ray: bool = typer.Option(False, "--ray", help="Run the steps as Ray tasks on a local instance started for the "
                             "run (docs/scale.md); the driver keeps the manifest and writes every record."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join a running Ray cluster: auto or "
                                              "HOST:PORT (implies --ray; bench nodes advertise the "
                                              "detbench_bench resource)."),
    ray_timeout: float = typer.Option(30.0, "--ray-timeout", help="Seconds the --ray-address may take to answer "
                                      "before the run stops (nothing listening: at once)."),
) -> None:
    """The main job: export, validate, profile, bench and evaluate every model, then write the report.

    Re-running skips steps whose inputs did not change; an interrupted run continues.
    """
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.ray_run import RayRun
    from pipeline.run import RunRequest, RunSettings, run_pipeline

    cluster = RayRun(address=ray_address, connect_timeout=ray_timeout) if ray or ray_address is not None else None

    names = [n.strip() for n in models.split(",") if n.strip()] if models else None
    if len(onnx_files) != len(describe):
        raise ConfigError(f"give one --describe per --onnx file ({len(onnx_files)} --onnx, {len(describe)} --describe)")
    settings = RunSettings.quick() if quick else RunSettings()
    if budget is not None:
        settings = dataclasses.replace(settings, budget_minutes=budget, bench_runs=None, bench_seconds=None)
    if threads is not None:
        settings = dataclasses.replace(settings, threads=threads)
    if bench_seconds is not None:
        settings = dataclasses.replace(settings, bench_seconds=bench_seconds, bench_runs=None)
    if bench_runs is not None:
        settings = dataclasses.replace(settings, bench_runs=bench_runs, bench_seconds=None)
    if eval_limit is not None:
        settings = dataclasses.replace(settings, eval_limit=eval_limit)
    if per_image is not None:
        settings = dataclasses.replace(settings, per_image=per_image, per_image_seconds=max(
            settings.per_image_seconds, 5.0 * per_image))
    if int8 is not None:
        choice = int8.strip().lower()
        settings = dataclasses.replace(settings, int8_models=None if choice == "all" else () if choice in (
            "none", "") else tuple(n.strip() for n in int8.split(",") if n.strip()))
    settings = dataclasses.replace(settings, sizes=sizes)
    if scenarios is not None:
        tokens = [x.strip() for x in scenarios.split(",") if x.strip()]
        if [x.lower() for x in tokens] in ([], ["none"]):
            settings = dataclasses.replace(settings, scenario_models=())
        elif [x.lower() for x in tokens] == ["all"]:
            settings = dataclasses.replace(settings, scenario_models=None, scenarios=("offline", "server"))
        else:
            kinds = tuple(x.lower() for x in tokens if x.lower() in ("offline", "server"))
            names = tuple(x for x in tokens if x.lower() not in ("offline", "server"))
            settings = dataclasses.replace(settings, scenarios=kinds or ("offline", "server"),
                                           scenario_models=names or RunSettings().scenario_models)
    if server_backends is not None:
        chosen = [x.strip() for x in server_backends.split(",") if x.strip()]
        settings = dataclasses.replace(settings, server_backends=settings.offline_backends if [
            x.lower() for x in chosen] == ["all"] else tuple(chosen))
    colours = {"done": "green", "reused": "cyan", "skipped": "yellow", "failed": "red"}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bars:
        overall = bars.add_task("steps", total=None)
        current = bars.add_task("", total=None, visible=False)

        def on_event(ev):
            where = " ".join(x for x in (ev.model, ev.step, ev.provider) if x)
            if ev.kind == "plan":
                bars.update(overall, total=ev.steps_total)
                bars.console.print(f"[bold]run[/]: {t(ev.message)}", highlight=False, soft_wrap=True)
            elif ev.kind == "start":
                bars.update(current, description=t(f"  {where}"), completed=0, total=None, visible=True)
            elif ev.kind == "update":
                bars.update(current, description=t(f"  {where}: {ev.message}"[:110]),
                            completed=ev.completed or 0, total=ev.total)
            elif ev.kind in colours:
                bars.update(overall, completed=ev.steps_done)
                bars.update(current, visible=False)
                if ev.kind != "reused" or ev.step == "report":
                    shown = ev.kind != "done" or ev.step in ("offline", "server")  # a scenario's figure
                    reason = f": {ev.message.splitlines()[0][:160]}" if ev.message and shown else ""
                    bars.console.print(f"[{colours[ev.kind]}]{ev.kind:>7}[/] {t(where + reason)}", highlight=False,
                                       soft_wrap=True)

        request = RunRequest(names, coco_dir=coco, providers=providers or None, report=not no_report,
                             foreign=list(zip(onnx_files, describe)) or None)
        summary = run_pipeline(request, settings, progress=on_event, ray=cluster)
    counts = ", ".join(f"{summary.count(s)} {s}" for s in colours)
    console.print(f"[bold]run finished in {summary.wall_seconds:.1f} s[/]: {counts} step(s); results in "
                  f"{t(summary.results_dir)}", highlight=False)
    lv = summary.latency_validity
    if lv:
        console.print(f"latency: {lv['p50_valid']}/{lv['pairs']} model x backend pairs with a VALID p50, "
                      f"{lv['p90_valid']} with a VALID p90 (timing {lv['seconds']:.0f} s)", highlight=False)
        for pair, why in lv["p50_invalid"].items():
            console.print(f"[yellow]p50 INVALID[/] {t(pair)}: {t(why)}", highlight=False, soft_wrap=True)
    if summary.store_note:
        print_error(summary.store_note, "warning:")
    for provider, reason in summary.providers.items():
        if reason:
            console.print(f"[yellow]provider {t(provider)} skipped[/]: {t(reason)}", highlight=False, soft_wrap=True)
    if summary.report is not None:
        console.print(f"report: {summary.report.html} (charts, table.csv, table.md in {summary.report.out_dir})",
                      highlight=False, markup=False)
    if summary.failures:
        for o in summary.failures:
            err_console.print(f"[bold red]failed[/] {t(o.model)} {o.step} {t(o.provider or '')}: {t(o.reason)}",
                              highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
@reports_errors
def report(
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder. Default: <results dir>/report."),
    all_registered: bool = typer.Option(False, "--all", help="One row per registered model, measured or not "
                                        "(default: the paper's eleven plus every model with results)."),
) -> None:
    """Charts (PNG), table (CSV + Markdown) and one self-contained HTML page from the results store."""
    from report import build_report
    from report.collect import MEASURED, provider_skips, providers

    result = build_report(out, all_registered=all_registered)
    if result.skipped_lines:
        print_error(result.skipped_lines, "warning:")
    rows = result.rows
    shown = [p for p in providers(rows) if p not in provider_skips(rows)]
    table = Table(title="detbench report", box=None, pad_edge=False, title_justify="left")
    for col in ("network", "HxW", "MParams", "GOps", "mAP@.5", "mAP", *[f"{p} ms" for p in shown]):
        table.add_column(col, no_wrap=True, justify="left" if col in ("network", "HxW") else "right")

    def num(v, digits):
        return "—" if v is None else f"{v:.{digits}f}"

    def acc(a):
        return "—" if a is None else f"{a.value:.1f} {'m' if a.status == MEASURED else 'p'}"

    for r in rows:
        table.add_row(t(r.label) + (" *" if r.paper else ""), f"{r.input_size[0]}x{r.input_size[1]}", num(r.mparams, 2),
                      num(r.gops, 2), acc(r.map50), acc(r.map),
                      *[num(r.latency[p].p50_ms, 1) if p in r.latency else "—" for p in shown])
    console.print(table)
    console.print("* paper configuration; GOps = 2 x GMACs (all ops, analyzer); mAP in %: m = measured here, "
                  "p = published (models.toml); latency = p50 ms, batch 1. Sources and reasons: table.md.",
                  highlight=False)
    for p, why in provider_skips(rows).items():
        console.print(f"[yellow]provider {t(p)} not measured[/]: {t(why)}", highlight=False, soft_wrap=True)
    console.print(f"wrote {len(result.charts)} charts, {result.csv.name}, {result.markdown.name} and "
                  f"{result.html} in {result.out_dir}", highlight=False, markup=False)


@app.command()
@reports_errors
def compare(
    a: Path = typer.Argument(..., metavar="A", help="Reference results folder (as DETBENCH_RESULTS names it) or its results.jsonl."),
    b: Path = typer.Argument(..., metavar="B", help="Results folder or results.jsonl compared against A."),
    max_slowdown: str = typer.Option("5%", "--max-slowdown", help="Latency growth (median B / A) tolerated; beyond "
                                     "it, and significant by the rank test, B is a regression. 5% or 0.05."),
    max_map_drop: float = typer.Option(0.1, "--max-map-drop", help="mAP@0.5 or mAP@[.5:.95] drop tolerated, in "
                                       "COCO points (0.1 = 0.1 AP point)."),
    alpha: float = typer.Option(0.01, "--alpha", help="Significance level of the one-sided Mann-Whitney U test."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON instead of tables."),
    allow_nothing_in_common: bool = typer.Option(False, "--allow-nothing-in-common", help="Exit 0 when A and B share "
                                                 "no configuration (default: exit 2, nothing was compared)."),
) -> None:
    """Latency (rank test on raw samples), mAP and size of B against A; exits 1 when something regressed."""
    import json

    from report.compare import compare_stores, parse_fraction

    result = compare_stores(a, b, max_slowdown=parse_fraction(max_slowdown, "--max-slowdown"),
                            max_map_drop=max_map_drop, alpha=alpha, allow_nothing_in_common=allow_nothing_in_common)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from report.compare_render import render

        render(result, console)
    if result.regressions:
        raise typer.Exit(1)


@app.command("eval")
@reports_errors
def eval_command(
    ctx: typer.Context,
    model: Optional[Path] = typer.Argument(None, help="Exported ONNX detector (omit with --results)."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO folder: annotations/instances_val2017.json + val2017/."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO instances file (instead of --coco's)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images folder (instead of --coco's val2017/)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Score this existing COCO results file; no model is run."),
    provider: str = typer.Option("cpu", "--provider", "-p", help="Backend (see `backends`): cpu, openvino, "
                                 "openvino-bf16, native, cuda, tensorrt, ... A non-cpu backend is first compared "
                                 "with onnxruntime CPU on 3 COCO images (recorded)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N images (by id)."),
    image_ids: Optional[str] = typer.Option(None, "--image-ids", help="Comma-separated image ids to evaluate."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its detection cache."),
    backend: str = typer.Option("pycocotools", "--backend", help="Scoring: pycocotools or faster-coco-eval."),
    per_category: bool = typer.Option(False, "--per-category", help="Also show AP per category."),
    iou_type: str = typer.Option("bbox", "--iou-type", help="With --results: bbox or segm."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Override/supply the input size: N or HxW."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Override/supply the resize mode: letterbox or stretch."),
    label_space: Optional[str] = typer.Option(None, "--label-space", help="Override/supply labels: coco80, coco91 or "
                                              "names (with --labels)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Names file (one class per line) of a model exported "
                                          "elsewhere: its labels index these names (implies --label-space names)."),
    out: Optional[Path] = typer.Option(None, "--out", help="COCO results file to write (default under results/eval/)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Per-image detection cache (default under results/eval/)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    workers: int = typer.Option(2, "--workers", help="Background image decode/resize threads."),
    prefetch: int = typer.Option(4, "--prefetch", help="Images prepared ahead of the session at most."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Run even if the provider fell back to CPU."),
    allow_calibration_overlap: bool = typer.Option(False, "--allow-calibration-overlap", help="Score an INT8 model "
                                                   "even on images it was calibrated on (biased)."),
    ray: bool = typer.Option(False, "--ray", help="Run the images on Ray: a local instance started for the run "
                             "(all CPUs, no dashboard), or the cluster of --ray-address. --threads is per actor "
                             "(default 1). See docs/scale.md."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join a running Ray cluster: auto or "
                                              "HOST:PORT (implies --ray)."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="Inference actors (default: the cluster's "
                                             "CPUs / --threads, or one per GPU)."),
    ray_batch: int = typer.Option(4, "--ray-batch", help="Images per Ray block (prepared, inferred, retried and "
                                  "cached together)."),
    ray_timeout: float = typer.Option(30.0, "--ray-timeout", help="Seconds the --ray-address may take to answer "
                                      "before the evaluation stops (nothing listening: at once)."),
) -> None:
    """COCO accuracy (pycocotools COCOeval) of an exported detector, or of an existing results file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    ids = None
    if image_ids is not None:
        try:
            ids = [int(part) for part in image_ids.replace(" ", "").split(",") if part]
        except ValueError:
            raise ConfigError(f"--image-ids {image_ids!r}: expected comma-separated integers, e.g. 139,285") from None
    if results is not None:
        from eval.coco import score_results

        if model is not None:
            raise ConfigError("give a model or --results FILE, not both")
        if annotations is None and coco is None:
            raise ConfigError("--results needs the ground truth: --annotations FILE or --coco DIR")
        ann = annotations or coco / "annotations" / "instances_val2017.json"
        scores = score_results(results, ann, backend, iou_type=iou_type, image_ids=ids, per_category=per_category)
        _render_eval_scores(scores, f"{results} ({scores['detections']} detections, {scores['images']} images)")
        return
    if model is None:
        raise ConfigError("name the ONNX model to evaluate (or pass --results FILE to score a results file)")
    from eval.coco import EvalSettings, evaluate_model

    overrides = {}
    size = parse_size(input_size)
    if size is not None:
        overrides.update(input_height=size[0], input_width=size[1])
    if resize is not None:
        overrides["resize"] = resize
    if label_space is not None:
        overrides["label_space"] = label_space
    if labels is not None:
        import json

        from core.contract import read_names_file

        overrides.update(label_space=label_space or "names", labels=json.dumps(read_names_file(labels)))

    columns = (TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    finished = 0
    with _resume_hint_on_interrupt(ctx, lambda: finished), Progress(*columns, console=err_console, transient=False) as bar:
        task = None

        def on_progress(p) -> None:
            nonlocal task, finished
            finished = p.done
            ran = p.done - p.resumed
            rate = f"{ran / p.wall_seconds:.1f} img/s" if ran and p.wall_seconds > 0 else "-- img/s"
            if task is None:  # created at the first report so resumed images are not counted as speed
                task = bar.add_task("eval", total=p.total, completed=p.done, rate=rate)
            bar.update(task, completed=p.done, rate=rate + (f", {p.skipped} skipped" if p.skipped else ""))

        settings = EvalSettings(coco_dir=coco, annotations=annotations, images=images, provider=provider,
                                limit=limit, image_ids=ids, resume=resume, overrides=overrides or None,
                                backend=backend, per_category=per_category, results_file=out, cache_file=cache,
                                threads=threads, workers=workers, prefetch=prefetch, allow_fallback=allow_fallback,
                                allow_calibration_overlap=allow_calibration_overlap)
        if ray or ray_address is not None:
            from eval.ray_eval import RaySettings, evaluate_model_ray

            cluster = RaySettings(address=ray_address, actors=ray_actors, batch_size=ray_batch,
                                  connect_timeout=ray_timeout)
            result = evaluate_model_ray(model, settings, ray_settings=cluster, progress=on_progress)
        else:
            result = evaluate_model(model, settings, progress=on_progress)
    resumed = f", {result.images_resumed} from the cache of an earlier run" if result.images_resumed else ""
    _render_eval_scores(result.scores, f"{result.model} on {result.provider} ({result.contract['detbench.resize']}, "
                                       f"{result.images_evaluated} of {result.images_selected} images evaluated{resumed})")
    parity = result.settings.get("parity")
    console.print(f"backend {result.provider}: {result.settings.get('precision', 'f32')} inference"
                  + (f"; parity with onnxruntime CPU: {parity['verdict']} ({parity['matched']}/{parity['total']} "
                     f"matched, max |box| {parity['max_box_px']} px, max |score| {parity['max_score']}; "
                     f"{parity['tolerance_text']})" if parity else ""), highlight=False, soft_wrap=True)
    mapping = result.settings.get("label_mapping") or {}
    if mapping.get("by") == "name":
        console.print(f"labels mapped to {t(result.annotations_file)} by class name: {mapping['matched']} matched; "
                      f"model classes matching no category (detections dropped): "
                      f"{t(', '.join(mapping['model_unmatched']) or 'none')}; categories matching no model class: "
                      f"{t(', '.join(mapping['dataset_unmatched']) or 'none')}", highlight=False, soft_wrap=True)
    for skip in result.images_skipped:
        console.print(f"[yellow]skipped[/] {t(skip['file_name'])}: {t(skip['reason'])}", highlight=False, soft_wrap=True)
    if result.session_seconds > 0:
        console.print(
            f"time (measured): whole evaluation {result.wall_seconds:.2f} s vs inside session.run "
            f"{result.session_seconds:.2f} s = {result.overhead:.3f} x; image loop {result.loop_seconds:.2f} s = "
            f"{result.loop_overhead:.3f} x; {result.images_per_second:.2f} images/s; scoring "
            f"{result.score_seconds:.2f} s; session creation {result.session_create_seconds:.2f} s", highlight=False)
    if "ray" in result.settings:
        pool = result.settings["ray"]
        console.print(f"ray: {pool['actors']} actor(s) x {pool['threads_per_actor']} thread(s), batches of "
                      f"{pool['batch_size']}, on {', '.join(pool['hosts']) or 'no host (all from the cache)'} "
                      f"({pool['address']}); session.run time summed over actors", highlight=False, markup=False)
    console.print(f"results: {result.results_file}\ncache:   {result.cache_file}", highlight=False, soft_wrap=True,
                  markup=False)


@contextlib.contextmanager
def _resume_hint_on_interrupt(ctx, images_done):
    """Ctrl-C during `eval`: say how to continue (the detection cache keeps every finished image), exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(
            f"[bold yellow]interrupted[/] after {images_done()} image(s); the detection cache keeps every finished "
            f"image. Continue with:\n  {t(_same_command_with(ctx, '--resume'))}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _same_command_with(ctx: typer.Context, flag: str) -> str:
    """The command being run, rebuilt from its parsed options (not sys.argv: exact under any launcher), plus ``flag``."""
    import shlex

    words = ["python", "cli.py", ctx.info_name or "eval"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == [] or value == ():
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            if value:
                words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    if flag not in words:
        words.append(flag)
    return shlex.join(words)


def _render_eval_scores(scores: dict, title: str) -> None:
    console.print(f"[bold]COCOeval {scores['iou_type']} ({scores['backend']})[/]: {t(title)}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("statistic")
    table.add_column("value", justify="right")
    labels = {"AP": "AP @[.50:.95] (mAP)", "AP50": "AP @.50 (mAP@0.5)", "AP75": "AP @.75", "APs": "AP small",
              "APm": "AP medium", "APl": "AP large", "AR1": "AR maxDets 1", "AR10": "AR maxDets 10",
              "AR100": "AR maxDets 100", "ARs": "AR small", "ARm": "AR medium", "ARl": "AR large"}
    for key, value in scores["stats"].items():
        table.add_row(labels.get(key, key), "n/a (no ground truth)" if value < 0 else f"{value:.4f}")
    console.print(table)
    console.print(f"[bold]mAP@0.5 = {100 * scores['map50']:.2f}   mAP@[.5:.95] = {100 * scores['map']:.2f}[/] "
                  "(COCO AP in points, measured)", highlight=False)
    if scores.get("per_category"):
        per = Table(title="AP per category", title_justify="left")
        for col in ("category", "id", "AP", "AP50"):
            per.add_column(col, justify="left" if col == "category" else "right")
        absent = [name for name, row in scores["per_category"].items() if row["AP"] is None]
        for name, row in scores["per_category"].items():
            if row["AP"] is not None:
                per.add_row(t(name), str(row["id"]), f"{row['AP']:.4f}", f"{row['AP50']:.4f}")
        console.print(per)
        if absent:
            console.print(f"({len(absent)} more categories have no ground truth in these images: no AP)",
                          highlight=False)


@app.command()
@reports_errors
def profile(
    model: Path = typer.Argument(..., help="An ONNX file (a detbench export, or any graph with --shapes static)."),
    shapes: str = typer.Option("static", "--shapes", help="static: ONNX shape inference at the file's input size; "
                               "measured: run once in onnxruntime on a real image and count with the shapes seen."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image for --shapes measured (default: a COCO val2017 "
                                         "image from $DETBENCH_DATA)."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="Profile even if some ops have no counting "
                                       "rule (they are listed as uncounted)."),
    top: int = typer.Option(15, "--top", help="Rows in the table of nodes by MACs."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per node here."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the full profile (every node) as JSON here."),
    onnx_tool: bool = typer.Option(True, "--onnx-tool/--no-onnx-tool", help="Cross-check with onnx-tool's figures."),
    store: bool = typer.Option(True, "--store/--no-store", help="Append a 'profile' record to the results store."),
) -> None:
    """Per-node MACs, parameters and memory traffic of an ONNX detector; totals by op type."""
    from counting import profile_model
    from counting.render import write_csv, write_json

    if top < 0:
        raise ConfigError(f"--top {top}: give a number of rows >= 0")
    check_file(model)
    for option, target in (("--csv", csv_file), ("--json", json_file)):
        if target is not None and target.is_dir():
            raise ConfigError(f"{option} {target} is a directory: give a file name, e.g. {target / ('profile' + option.replace('--', '.'))}")
    result = profile_model(model, shapes=shapes, image=image, allow_unknown=allow_unknown, cross_check=onnx_tool)
    _render_profile(result, top)
    if csv_file:
        console.print(f"per-node CSV -> {write_csv(result, csv_file)}", markup=False, highlight=False)
    if json_file:
        console.print(f"full profile JSON -> {write_json(result, json_file)}", markup=False, highlight=False)
    if store:
        from core import store as results_store
        from core.contract import sha256_file

        results_store.append("profile", result.to_dict(), model=result.model, model_sha256=sha256_file(model),
                             settings={"shapes": shapes, "image": result.image, "allow_unknown": allow_unknown},
                             contract={k: v for k, v in result.contract.items()})


def _giga(value: int) -> str:
    return f"{value / 1e9:,.3f} G"


def _render_profile(p, top: int) -> None:
    d = p.to_dict()
    mode = (f"measured shapes (one onnxruntime run on {p.image})" if p.mode == "measured"
            else "static shapes (onnx shape inference)")
    weights = p.contract.get("detbench.weights", "")
    init = " — random-init weights (counts do not depend on weight values)" if weights == "random-init" else ""
    console.print(f"[bold]{t(p.model)}[/] {t(p.path)}  input {t(list(p.input_shape))}  — figures from {t(mode)}{init}",
                  highlight=False, soft_wrap=True)

    summary = Table(title=f"totals ({p.mode} shapes)")
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    summary.add_column("what it is")
    summary.add_row("MACs", _giga(d["macs"]), "every counted node (multiply-accumulates; other ops in MAC-equivalents)")
    summary.add_row("FLOPs", _giga(d["flops"]), "2 x MACs")
    summary.add_row("conv-only MACs", _giga(d["conv_macs"]), "Conv + ConvTranspose")
    summary.add_row("conv-only FLOPs", _giga(d["conv_flops"]), "2 x conv-only MACs = Darknet's BFLOPs convention")
    summary.add_row("linear MACs", _giga(d["linear_macs"]),
                    "Conv, ConvTranspose, Gemm, MatMul = torchvision's 'GFLOPS' convention")
    summary.add_row("network MACs", _giga(d["network_macs"]), "nodes that feed a learned op")
    summary.add_row("post-processing MACs", _giga(d["postprocess_macs"]), "decode, NMS, TopK, RoI ops, mask handling")
    summary.add_row("parameters", f"{d['params']:,}", "weights/biases of learned ops, BN scale+bias (see conventions)")
    summary.add_row("folded_norm_constants", f"{d['folded_norm_constants']:,}",
                    "per-channel x*a+b / (x-m)/s constants: NOT parameters")
    summary.add_row("BN running statistics", f"{d['bn_running_stats']:,}", "BatchNormalization mean/var: NOT parameters")
    summary.add_row("other constants", f"{d['other_constants']:,}", "anchors, shapes, scalars: NOT parameters")
    summary.add_row("bytes read / written", f"{d['bytes_read'] / 1e6:,.1f} / {d['bytes_written'] / 1e6:,.1f} MB",
                    "weights + activations, per node, element type as the graph says")
    check = p.onnx_tool
    if check is not None:
        if check.get("status") == "ok":
            summary.add_row("onnx-tool MACs (cross-check)", _giga(check["macs"]),
                            f"{check['scope']}; ours on that scope: {_giga(check['ours']['macs'])} "
                            "(onnx-tool also counts bias adds)")
            summary.add_row("onnx-tool Conv MACs", _giga(check["conv_macs"]),
                            f"ours: {_giga(check['ours']['conv_macs'])}")
        elif check.get("status") == "skipped":
            summary.add_row("onnx-tool cross-check", "[yellow]skipped[/]",
                            escape(f"{check.get('reason')} (scope: {check.get('scope')})"))
        else:
            summary.add_row("onnx-tool cross-check", "[yellow]failed[/]",
                            escape(f"at {check.get('stage')}: {check.get('error')} — no cross-check figure "
                                   f"(scope: {check.get('scope')})"))
    else:
        summary.add_row("onnx-tool cross-check", "not run", "--no-onnx-tool")
    console.print(summary)

    nodes = Table(title=f"top {top} nodes by MACs ({p.mode} shapes)")
    for col in ("node", "op", "part", "input", "output", "MACs", "x", "params", "read MB", "written MB",
                "FLOP/B", "shapes"):
        nodes.add_column(col, justify="right" if col in ("MACs", "x", "params", "read MB", "written MB", "FLOP/B") else "left")
    from counting.ops import shape_str

    for n in p.top(top):
        nodes.add_row(t(n.name), t(n.op_type), t(n.part), t(shape_str(n.inputs[0][1])) if n.inputs else "",
                      t(shape_str(n.outputs[0][1])) if n.outputs else "",
                      f"{n.macs:,}" if n.macs is not None else "?", str(n.executions), f"{n.params:,}",
                      f"{n.bytes_read / 1e6:.2f}" if n.bytes_read is not None else "?",
                      f"{n.bytes_written / 1e6:.2f}" if n.bytes_written is not None else "?",
                      f"{n.intensity:.1f}" if n.intensity is not None else "?", t(n.shape_source))
    console.print(nodes)

    by_op = Table(title=f"by op type ({p.mode} shapes)")
    for col in ("op", "nodes", "MACs", "share", "params", "MB moved", "unresolved"):
        by_op.add_column(col, justify="left" if col == "op" else "right")
    total = max(d["macs"], 1)
    for op, row in d["by_op"].items():
        by_op.add_row(t(op), str(row["nodes"]), f"{row['macs']:,}", f"{100 * row['macs'] / total:.2f} %",
                      f"{row['params']:,}", f"{row['bytes'] / 1e6:,.1f}", str(row["unresolved"] or ""))
    console.print(by_op)

    if d["unknown_nodes"]:
        console.print("[bold red]uncounted ops (no counting rule):[/] " + t(", ".join(
            f"{op} x{len(names)}" for op, names in d["unknown_nodes"].items())), highlight=False)
    if d["unresolved_nodes"]:
        names = d["unresolved_nodes"]
        console.print(f"[yellow]{len(names)} node(s) with unresolved (data-dependent) shapes, not counted:[/] "
                      + t(", ".join(names[:8])) + (" ..." if len(names) > 8 else "")
                      + ("  — use --shapes measured" if p.mode == "static" else ""))
    if d["static_mismatches"]:
        console.print(f"[yellow]static inference disagreed with the measured shape for {len(d['static_mismatches'])} "
                      "value(s); measured shapes were used[/]")
    conv = d["conventions"]
    console.print("[dim]conventions: " + t("; ".join([conv["mac"], conv["linear_ops"], "params: " + conv["params"],
                                                   "zero-MAC ops: data movement (Reshape, Concat, Gather, ...)",
                                                   conv["control_flow"], "post-processing: " + conv["postprocess"],
                                                   conv["shapes"]])) + "[/]")


if __name__ == "__main__":
    app()
