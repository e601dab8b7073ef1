"""Show a verification report: a rich table, JSON, and an HTML page with a depth plot."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vidport.golden.compare import Report
from vidport.golden.metrics import THRESHOLDS, Threshold, snr_db
from vidport.reference.build import SELF_MAPPED


def print_report(report: Report, console: Console, limit: int | None = None) -> None:
    """A quantized port's table lists its worst layers first (where the bits hurt), with each
    layer's local SNR and the format whose thresholds it was held to; any other in call order."""
    reference = report.info.get("reference")
    against = (" against a [bold red]SELF-MAPPED[/] reference (vidport's own mapping: not an independent check)"
               if reference == SELF_MAPPED else f" against {reference}" if reference else "")
    quantized = report.quantization is not None
    bounds = (f"; quantized {report.quantization}: {_bounds(THRESHOLDS[report.quantization])}, the other layers "
              if quantized and report.quantization in THRESHOLDS else "; ")
    table = Table(title=f"per-layer parity{against} ({report.dtype} weights{bounds}{_bounds(report.threshold)})"
                        + (", worst first" if quantized else ""))
    numeric = ("#", "PCC", "max abs", "rel L2", "SNR dB", "global PCC")
    for column in ("#", "layer", "module", "PCC", "max abs", "rel L2", *(("SNR dB", "held to") if quantized else ()),
                   "global PCC", ""):
        table.add_column(column, justify="right" if column in numeric else "left")
    depth = {row.name: index for index, row in enumerate(report.layers)}
    ordered = report.ranked() if quantized else report.layers
    first = report.first_failure
    shown = ordered
    if limit is not None and len(shown) > limit:
        keep = {r.name for r in (shown[:limit] if quantized else shown[-limit:])} | {r.name for r in shown if not r.passed}
        shown = [r for r in shown if r.name in keep]
    for row in shown:
        g = f"{row.global_['pcc']:.6f}" if row.global_ else "-"
        mark = "[green]ok[/]" if row.passed else ("[bold red]FIRST FAIL[/]" if row.name == first else "[red]fail[/]")
        extra = (f"{snr_db(row.local):.1f}", row.quantized or report.dtype) if quantized else ()
        table.add_row(str(depth[row.name]), row.name, row.kind, f"{row.local['pcc']:.6f}", f"{row.local['max_abs']:.2e}",
                      f"{row.local['rel_l2']:.2e}", *extra, g, mark)
    console.print(table)
    if limit is not None and len(report.layers) > len(shown):
        console.print(f"({len(report.layers) - len(shown)} passing layers not shown; --all shows every layer)")
    for title, values in (("from --set, not from the file", report.info.get("overrides")),
                          ("assumed (no known release matched)", report.info.get("assumed"))):
        if values:
            console.print(f"[bold yellow]config {title}:[/] " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                          + " (the reference was built with these too: a wrong value fails neither side)")
    for output in report.uncompared_outputs:
        console.print(f"[bold red]output {output} has no reference counterpart: not compared[/]")
    for warning in report.info.get("warnings") or []:
        console.print(f"[bold yellow]WARNING:[/] {warning}")
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    reference_note = " against a SELF-MAPPED reference" if reference == SELF_MAPPED else ""
    console.print(f"{verdict}{reference_note}: {sum(r.passed for r in report.layers)}/{len(report.layers)} layers "
                  f"within threshold; first failing layer: {first or 'none'}; worst layer: {report.worst}")


def _bounds(threshold: Threshold) -> str:
    return (f"PCC >= {threshold.min_pcc}"
            + (f", max abs <= {threshold.max_abs:g} x max(1, rms)" if threshold.max_abs else "")
            + (f", rel L2 <= {threshold.max_rel_l2:g}" if threshold.max_rel_l2 else ""))


def write_json(report: Report, path: Path) -> None:
    Path(path).write_text(json.dumps(report.as_json(), indent=2, default=_finite))


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _polyline(values: list[float], width: int, height: int, low: float, high: float) -> str:
    if not values:
        return ""
    step = width / max(1, len(values) - 1)
    span = (high - low) or 1.0
    points = [f"{i * step:.1f},{height - (min(max(v, low), high) - low) / span * height:.1f}" for i, v in enumerate(values)]
    return " ".join(points)


def write_html(report: Report, path: Path) -> None:
    """One self-contained page: PCC and log10 relative error against layer depth, then the table."""
    width, height = 900, 220
    pcc = [r.local["pcc"] for r in report.layers]
    rel = [math.log10(max(r.local["rel_l2"], 1e-12)) for r in report.layers]
    gpcc = [r.global_["pcc"] if r.global_ else float("nan") for r in report.layers]
    low = min([report.threshold.min_pcc - (1 - report.threshold.min_pcc)] + [p for p in pcc if math.isfinite(p)])
    floor_y = height - (report.threshold.min_pcc - low) / ((1 - low) or 1) * height
    rows = "\n".join(
        f"<tr class={'ok' if r.passed else 'bad'}><td>{i}</td><td>{html.escape(r.name)}</td><td>{r.kind}</td>"
        f"<td>{r.local['pcc']:.6f}</td><td>{r.local['max_abs']:.2e}</td><td>{r.local['rel_l2']:.2e}</td>"
        f"<td>{(r.global_ or {}).get('pcc', float('nan')):.6f}</td></tr>" for i, r in enumerate(report.layers))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vidport verify</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;font-size:12px}} .bad{{background:#fdd}}
svg{{border:1px solid #ccc;background:#fafafa}}</style></head><body>
<h1>vidport verify: {'PASSED' if report.passed else 'FAILED'}</h1>
<p>reference: {html.escape(str(report.info.get("reference")))}; weights {report.dtype}; threshold PCC &ge; {report.threshold.min_pcc}; first failing layer:
<b>{html.escape(str(report.first_failure))}</b>; worst layer: {html.escape(str(report.worst))}</p>
<h2>PCC against layer depth (local: blue, global: orange; red line: threshold)</h2>
<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<line x1="0" x2="{width}" y1="{floor_y:.1f}" y2="{floor_y:.1f}" stroke="red" stroke-dasharray="4"/>
<polyline fill="none" stroke="#1f77b4" points="{_polyline(pcc, width, height, low, 1.0)}"/>
<polyline fill="none" stroke="#ff7f0e" points="{_polyline([g if math.isfinite(g) else 1.0 for g in gpcc], width, height, low, 1.0)}"/>
</svg>
<h2>log10 relative L2 error against layer depth (local)</h2>
<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<polyline fill="none" stroke="#2ca02c" points="{_polyline(rel, width, height, min(rel, default=-12), max(rel + [0.0]))}"/>
</svg>
<table><tr><th>#</th><th>layer</th><th>module</th><th>PCC</th><th>max abs</th><th>rel L2</th><th>global PCC</th></tr>
{rows}</table></body></html>"""
    Path(path).write_text(page)
