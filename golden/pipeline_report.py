"""Show pipeline parity reports: a rich table per task (one row per scheduler step), and JSON."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vidport.golden.pipeline_parity import PipelineReport

TITLES = {"t2v": "text-to-video", "i2v": "image-to-video", "ti2v": "text/image-to-video (TI2V)"}


def print_pipeline_report(report: PipelineReport, console: Console) -> None:
    s, t = report.settings, report.threshold
    weights = f"{report.dtype}, {report.quantization}" if report.quantization else report.dtype
    table = Table(title=f"{TITLES.get(report.task, report.task)} parity against {s.get('reference', 'the reference')} "
                        f"({weights}; step PCC >= {t.min_step_pcc}, frames PSNR >= {t.min_psnr:g} dB)")
    experts = s.get("experts")  # several models or stages (Wan 2.2 A14B, LTX-2 distilled): which ran each step
    audio = any("audio_pcc" in row.metrics for row in report.steps)  # a pipeline that makes sound
    for column in ("step", "timestep", *(["model"] if experts else []), "PCC", *(["audio PCC"] if audio else []),
                   "max abs", "rel L2", "latent rms", ""):
        table.add_column(column, justify="left" if column in ("", "model") else "right")
    for row in report.steps:
        m = row.metrics
        table.add_row(str(row.index), f"{row.timestep:g}", *([experts[row.index]] if experts else []),
                      f"{m['pcc']:.8f}", *([f"{m['audio_pcc']:.8f}"] if audio else []), f"{m['max_abs']:.2e}",
                      f"{m['rel_l2']:.2e}", f"{m['ref_rms']:.3g}", "[green]ok[/]" if row.passed else "[red]fail[/]")
    console.print(table)
    worst = report.worst_step
    psnr_ok = report.psnr >= t.min_psnr
    console.print(f"  {s.get('frames')} frames {s.get('width')}x{s.get('height')}, {len(report.steps)} steps of "
                  f"{s.get('scheduler')}, guidance {s.get('guidance')}" + (f", strength {s['strength']}" if "strength" in s else "")
                  + f", seed {s.get('seed')}"
                  + (f"; prompt embeddings (our text encoder against the reference's): PCC {report.text['pcc']:.8f}"
                     if report.text else ""))
    console.print(f"  worst step: {worst.index if worst else '-'} (PCC {worst.metrics['pcc']:.8f}); final frames PSNR "
                  + (f"[green]{report.psnr:.1f} dB[/]" if psnr_ok else f"[red]{report.psnr:.1f} dB[/]")
                  + f"; time: reference {report.seconds.get('reference', 0):.1f} s, mlx {report.seconds.get('mlx', 0):.1f} s")
    growth = report.growth
    if growth and report.quantization:
        ratio = f" (x{growth['ratio']:.1f})" if growth["ratio"] is not None else ""
        console.print(f"  error growth over the steps: 1 - PCC {growth['first_step_error']:.2e} at the first step, "
                      f"{growth['last_step_error']:.2e} at the last{ratio}")
    if report.audio_snr is not None:
        ok = report.audio_snr >= t.min_audio_snr
        console.print("  waveform SNR " + (f"[green]{report.audio_snr:.1f} dB[/]" if ok else f"[red]{report.audio_snr:.1f} dB[/]")
                      + f" (>= {t.min_audio_snr:g} dB)")
    for name, m in report.intermediates.items():
        console.print(f"  {name} latents: PCC {m['pcc']:.8f}, max abs {m['max_abs']:.2e}")
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    failing = [r.index for r in report.steps if not r.passed]
    console.print(f"{verdict}: {len(report.steps) - len(failing)}/{len(report.steps)} steps within threshold"
                  + (f"; first failing step: {failing[0]}" if failing else "")
                  + ("" if psnr_ok else f"; frames below {t.min_psnr:g} dB"))


def write_pipeline_json(reports: list[PipelineReport], path: Path) -> None:
    Path(path).write_text(json.dumps({"passed": all(r.passed for r in reports),
                                      "tasks": [r.as_json() for r in reports]}, indent=2))
