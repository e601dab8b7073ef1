"""Compare a port against reference calls, layer by layer: local error (each port layer fed the
reference's own inputs) and global error (the port running freely), and localize divergence."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from vidport.golden.metrics import Threshold, compare, passes, snr_db
from vidport.reference.probe import Probe
from vidport.golden.records import Call
from vidport.golden.tap_mlx import call_with, compute_dtype, from_port, modules_by_name, output_channels_last, port_inputs, tap


@dataclass
class LayerResult:
    name: str
    kind: str
    local: dict[str, float]
    global_: dict[str, float] | None
    passed: bool
    global_passed: bool | None
    is_probe_output: bool = False
    quantized: str | None = None  # the format whose thresholds apply: the layer is or holds a quantized one

    def as_json(self) -> dict[str, Any]:
        snr = snr_db(self.local)
        return {"name": self.name, "module": self.kind, **self.local, "snr_db": snr if abs(snr) != float("inf") else None,
                "passed": self.passed, "global": self.global_, "global_passed": self.global_passed,
                **({"quantized": self.quantized} if self.quantized else {})}


@dataclass
class Report:
    dtype: str
    threshold: Threshold
    layers: list[LayerResult]
    not_in_port: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    uncompared_outputs: list[str] = field(default_factory=list)  # probe outputs the reference did not record
    quantization: str | None = None  # the format of a quantized port (its layers' thresholds: per layer)

    @property
    def first_failure(self) -> str | None:
        """The first layer that fails on the reference's own inputs; when all pass there but the
        port still fails (a wrong weight in a layer an official reference has no counterpart of),
        the first whose free-running output diverges."""
        local = next((r.name for r in self.layers if not r.passed), None)
        if local is not None or self.passed:
            return local
        return next((r.name for r in self.layers if r.global_passed is False), None)

    @property
    def worst(self) -> str | None:
        return min(self.layers, key=lambda r: r.local["pcc"]).name if self.layers else None

    def ranked(self) -> list[LayerResult]:
        """Worst first: the failing layers, then by local PCC (where a quantized port's bits hurt most)."""
        return sorted(self.layers, key=lambda r: (r.passed, r.local["pcc"]))

    @property
    def passed(self) -> bool:
        outputs_ok = all(r.global_passed is not False for r in self.layers if r.is_probe_output)
        return bool(self.layers) and all(r.passed for r in self.layers) and outputs_ok and not self.uncompared_outputs

    def as_json(self) -> dict[str, Any]:
        """The report file: passed, first_failure, what was compared against (reference, the dtype
        of the weights that chose the thresholds, the source check, config values that came from
        --set or were assumed, warnings), then every layer."""
        shown = {key: self.info[key] for key in ("reference", "reference_run", "source", "overrides", "assumed",
                                                 "warnings") if key in self.info}
        quantized = {"quantization": self.quantization, "worst_layers": [r.name for r in self.ranked()[:10]]} \
            if self.quantization else {}
        return {"passed": self.passed, "first_failure": self.first_failure, **shown, "dtype": self.dtype, **quantized,
                "uncompared_outputs": self.uncompared_outputs, "layers": [r.as_json() for r in self.layers]}


def run_port(model: nn.Module, probes: list[Probe]) -> tuple[dict[str, Any], set[str]]:
    """Free run of every probe with the tap on: call name -> output in the reference's layout,
    and the last call of each probe (its output; for a probe of the whole model, module "",
    the last layer's)."""
    dtype = compute_dtype(model)
    modules = modules_by_name(model)
    outputs: dict[str, Any] = {}
    finals: set[str] = set()
    with tap(model) as records:
        for probe in probes:
            module = modules[probe.module] if probe.module else model
            args, kwargs = port_inputs(module, list(probe.args), dict(probe.kwargs), dtype)
            (getattr(module, probe.method) if probe.method else module)(*args, **kwargs)
            for name, layer, output in records:
                outputs[name] = from_port(output, output_channels_last(layer))
            if records:
                finals.add(records[-1][0])
            records.clear()
            mx.clear_cache()
    return outputs, finals


def compare_port(model: Any, probes: list[Probe], calls: list[Call], threshold: Threshold, dtype: str,
                 progress=None, quantized: Callable[[str], tuple[str, Threshold] | None] | None = None) -> Report:
    """`model`: a golden.port.Port (MLX, TTNN emulator or device), or an MLX model (wrapped as one).
    `quantized`: a module path -> (format, its thresholds) for the layers of a quantized port that
    are or hold a quantized layer (None for the others, held to `threshold`)."""
    from vidport.golden.port import as_port

    port = as_port(model)
    names = port.module_names()
    free, finals = port.run(probes)
    layers, missing = [], []
    for index, call in enumerate(calls):
        if call.module not in names:
            missing.append(call.name)
            continue
        try:
            local = compare(call.output, port.call(call.module, call.args, call.kwargs))
        except Exception as err:  # a layer that cannot run on the reference's inputs has diverged: name it
            local = {"pcc": 0.0, "cosine": 0.0, "max_abs": float("inf"), "mean_abs": float("inf"),
                     "rel_l2": float("inf"), "ref_rms": 0.0, "finite": False, "error": f"{type(err).__name__}: {err}"}
        global_ = compare(call.output, free[call.name]) if call.name in free else None
        fmt, applies = (quantized and quantized(call.module)) or (None, threshold)
        layers.append(LayerResult(call.name, call.kind, local, global_, passes(local, applies),
                                  passes(global_, applies) if global_ else None, call.name in finals, fmt))
        if progress:
            progress(index + 1, len(calls), call.name)
    recorded = {call.name for call in calls}
    formats = sorted({r.quantized for r in layers if r.quantized})
    return Report(dtype, threshold, layers, sorted(set(missing)), uncompared_outputs=sorted(finals - recorded),
                  quantization=", ".join(formats) or None)
