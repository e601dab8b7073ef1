"""`vidport quantize-report`: one source converted at each quantized format and verified layer by layer
against the same reference run (built once, then read back as a golden), so a user picks bits from
evidence: per format the worst and median layer PCC and SNR, the weights' bytes, and a plot of the
error by layer depth (a self-contained HTML page with inline SVG)."""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from vidport.converter.core.errors import VidportError
from vidport.converter.quantize import MODES, QuantFormat
from vidport.golden.compare import Report
from vidport.golden.metrics import snr_db

DEFAULT_FORMATS = ("affine-q8-g64", "affine-q6-g64", "affine-q4-g64", "mxfp8-g32", "mxfp4-g32", "nvfp4-g16")
FLOAT = "float"  # the unquantized conversion every format is weighed against
_NAME = re.compile(r"^(?:affine-q(?P<bits>\d)|(?P<mode>[a-z]+\d))-g(?P<group>\d+)$")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def parse_format(name: str) -> QuantFormat:
    """A format by the name reports give it (QuantFormat.name): affine-q4-g64, mxfp4-g32, ..."""
    found = _NAME.match(name.strip())
    if found is None:
        raise VidportError(f"{name}: not a format name", hint="e.g. affine-q8-g64, affine-q4-g32, mxfp8-g32, mxfp4-g32, "
                                                              "nvfp4-g16")
    mode = found["mode"] or "affine"
    if mode not in MODES:
        raise VidportError(f"{name}: {mode} is not one of MLX's modes", hint=f"choose {', '.join(MODES)}")
    table = MODES[mode]
    if int(found["group"]) not in table["group_size"]:
        raise VidportError(f"{name}: {mode} takes groups of {' or '.join(map(str, table['group_size']))}")
    return QuantFormat.parse(int(found["bits"]) if found["bits"] else None, int(found["group"]), mode)


@dataclass
class FormatResult:
    """One format's conversion and per-layer verification."""

    name: str
    family: str
    report: Report
    weight_bytes: int
    quantized_layers: int
    kept_float: dict[str, str]

    def quantized_rows(self) -> list:
        """The layers held to the format's thresholds (those that are or hold a quantized layer)."""
        return [r for r in self.report.layers if r.quantized] or self.report.layers

    def summary(self) -> dict[str, Any]:
        rows = self.quantized_rows()
        worst = min(rows, key=lambda r: r.local["pcc"])
        pcc = [r.local["pcc"] for r in rows]
        snr = [snr_db(r.local) for r in rows]
        return {"format": self.name, "passed": self.report.passed, "worst_layer": worst.name,
                "worst_pcc": worst.local["pcc"], "median_pcc": statistics.median(pcc),
                "worst_snr_db": _finite(min(snr)), "median_snr_db": _finite(statistics.median(snr)),
                "weight_bytes": self.weight_bytes, "quantized_layers": self.quantized_layers,
                "kept_float": self.kept_float, "first_failure": self.report.first_failure}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def quantize_report(source: Path, family: str | None, formats: list[str], dtype: str | None = None,
                    overrides: dict[str, Any] | None = None,
                    progress: Callable[[str], None] | None = None) -> list[FormatResult]:
    """Convert `source` unquantized and at each of `formats` into temporary folders and verify each;
    the reference runs once (the first verification saves it as a golden the others read)."""
    from vidport.converter.convert import convert, plan_conversion
    from vidport.golden.verify import verify

    chosen = [parse_format(name) for name in formats]
    note = progress or (lambda item: None)
    results = []
    with tempfile.TemporaryDirectory(prefix="vidport-quantize-report-") as work:
        golden = Path(work) / "reference.golden.safetensors"
        for fmt in [None, *chosen]:
            name = fmt.name if fmt else FLOAT
            note(f"converting {name}")
            plan = plan_conversion(source, "mlx", family, dtype, overrides, quantize=fmt)
            folder = Path(work) / name
            manifest = convert(plan, folder)
            note(f"verifying {name}" + (" (building the reference)" if not golden.exists() else ""))
            report = verify(folder, golden=golden) if golden.exists() else verify(folder, source, save_to=golden)
            section = manifest.get("quantization") or {}
            results.append(FormatResult(name, manifest["family"], report, _weight_bytes(folder), len(section.get("tensors") or {}),
                                        dict(section.get("unquantized") or {})))
            shutil.rmtree(folder)
    return results


def print_table(results: list[FormatResult], console: Console) -> None:
    baseline = results[0].weight_bytes if results else 0
    table = Table(title="quantized formats against the float32 reference (local error of the quantized layers)")
    for column in ("format", "weights", "vs float", "layers", "worst PCC", "median PCC", "worst SNR dB",
                   "median SNR dB", "worst layer", ""):
        table.add_column(column, justify="left" if column in ("format", "worst layer", "") else "right")
    for result in results:
        s = result.summary()
        table.add_row(s["format"], _size(s["weight_bytes"]), f"{s['weight_bytes'] / baseline:.2f}x" if baseline else "-",
                      str(s["quantized_layers"]), f"{s['worst_pcc']:.6f}", f"{s['median_pcc']:.6f}",
                      _db(s["worst_snr_db"]), _db(s["median_snr_db"]), s["worst_layer"],
                      "[green]passes[/]" if s["passed"] else f"[red]fails: {s['first_failure']}[/]")
    console.print(table)


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count < 1e9 else f"{count / 1e9:.2f} GB"


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def as_json(results: list[FormatResult], source: Path) -> dict[str, Any]:
    """The summary per format, then each format's layers in call order (depth)."""
    return {"source": str(source), "family": results[0].family if results else None, "formats": [r.summary() for r in results],
            "layers": {r.name: [{"depth": i, "name": row.name, "module": row.kind, "pcc": row.local["pcc"],
                                 "rel_l2": row.local["rel_l2"], "snr_db": _finite(snr_db(row.local)),
                                 "quantized": row.quantized, "passed": row.passed}
                                for i, row in enumerate(r.report.layers)] for r in results}}


def write_json(results: list[FormatResult], path: Path, source: Path) -> None:
    Path(path).write_text(json.dumps(as_json(results, source), indent=2))


def _series(result: FormatResult) -> list[tuple[int, float]]:
    """(depth, local SNR dB) of the layers held to the format's thresholds; exact ones clipped to 120 dB."""
    return [(depth, min(snr_db(row.local), 120.0)) for depth, row in enumerate(result.report.layers)
            if row.quantized and math.isfinite(min(snr_db(row.local), 120.0))]


def svg_plot(results: list[FormatResult], width: int = 900, height: int = 320) -> str:
    """Local SNR (dB) against layer depth, one polyline per quantized format, with axes and a legend."""
    series = [(r.name, _series(r)) for r in results if r.name != FLOAT]
    depth = max((len(r.report.layers) for r in results), default=1) - 1 or 1
    values = [v for _, points in series for _, v in points] or [0.0]
    low, high = 10 * math.floor(min(values) / 10), 10 * math.ceil(max(values) / 10) or 10
    left, bottom = 50, 30
    plot_w, plot_h = width - left - 170, height - bottom - 10

    def x(d: float) -> float:
        return left + d / depth * plot_w

    def y(v: float) -> float:
        return 10 + (high - v) / ((high - low) or 1) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<rect x="{left}" y="10" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for tick in range(int(low), int(high) + 1, 10):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="12" text-anchor="middle">layer depth '
                 f'(call order, 0..{depth})</text><text x="12" y="{10 + plot_h / 2}" font-size="12" '
                 f'transform="rotate(-90 12 {10 + plot_h / 2})" text-anchor="middle">local SNR, dB</text>')
    for index, (name, points) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        line = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in points)
        parts.append(f'<polyline class="series" data-format="{html.escape(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5" points="{line}"/>')
        ly = 20 + 18 * index
        parts.append(f'<line x1="{width - 160}" x2="{width - 140}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/>'
                     f'<text x="{width - 134}" y="{ly + 4}" font-size="12">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_html(results: list[FormatResult], path: Path, source: Path) -> None:
    """One self-contained page: the summary table, the depth plot, and each format's five worst layers."""
    baseline = results[0].weight_bytes if results else 0
    rows = []
    for result in results:
        s = result.summary()
        rows.append(f"<tr class={'ok' if s['passed'] else 'bad'}><td>{html.escape(s['format'])}</td>"
                    f"<td>{_size(s['weight_bytes'])}</td><td>{s['weight_bytes'] / baseline:.2f}x</td>"
                    f"<td>{s['quantized_layers']}</td><td>{s['worst_pcc']:.6f}</td><td>{s['median_pcc']:.6f}</td>"
                    f"<td>{_db(s['worst_snr_db'])}</td><td>{_db(s['median_snr_db'])}</td>"
                    f"<td>{html.escape(s['worst_layer'])}</td><td>{'passes' if s['passed'] else 'fails'}</td></tr>")
    worst = "".join(f"<h3>{html.escape(r.name)}</h3><ol>" + "".join(
        f"<li>{html.escape(row.name)} ({row.kind}): PCC {row.local['pcc']:.6f}, SNR {_db(_finite(snr_db(row.local)))} dB</li>"
        for row in r.report.ranked()[:5]) + "</ol>" for r in results if r.name != FLOAT)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vidport quantize-report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;font-size:13px;text-align:right}}
.bad{{background:#fdd}}</style></head><body>
<h1>vidport quantize-report</h1>
<p>{html.escape(str(source))} ({html.escape(results[0].family if results else "")}): each format converted and verified layer by layer against the
float32 reference; local error: each layer run on the reference's own inputs.</p>
<table><tr><th>format</th><th>weights</th><th>vs float</th><th>quantized layers</th><th>worst PCC</th><th>median PCC</th>
<th>worst SNR dB</th><th>median SNR dB</th><th>worst layer</th><th></th></tr>
{chr(10).join(rows)}</table>
<h2>Local SNR of the quantized layers against depth</h2>
{svg_plot(results)}
<h2>Worst layers</h2>{worst}
</body></html>"""
    Path(path).write_text(page)
