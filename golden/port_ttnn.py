"""The TTNN port: the family's TTNN model on the host emulator (or, with --device, a card).

TTNN modules take and return the reference's layouts (they permute inside, on the ops
interface), so recorded numpy inputs go in through `ops.to_device` (bfloat16, as activations
enter a device; float32 for the arguments a module lists in `float32_inputs`, the paths a model
keeps in float32) and outputs come back through `ops.to_host`; calls are recorded by the
`Module.observer` hook of runtime/ttnn/module.py."""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vidport.golden.port import bind_recorded
from vidport.reference.probe import Probe
from vidport.golden.records import CallNamer
from vidport.runtime.ttnn.module import Module
from vidport.runtime.ttnn.ops import Ops


class TtnnPort:
    def __init__(self, model: Module, ops: Ops) -> None:
        self.model, self.ops = model, ops
        self.modules = {"": model, **dict(model.named_modules())}  # "": the whole model (a probe of it all)
        self.names = {id(m): name for name, m in self.modules.items()}

    @classmethod
    def open(cls, folder: Path, device: bool = False) -> "TtnnPort":
        from vidport.runtime.ttnn.loading import load_model, make_ops

        ops = make_ops(device)
        return cls(load_model(folder, ops), ops)

    def module_names(self) -> set[str]:
        return set(self.modules)

    def _in(self, value: Any, dtype: str = "bfloat16") -> Any:
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            return self.ops.to_device(value, dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._in(v, dtype) for v in value)
        return value

    def _inputs(self, module: Module, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, on the device in the dtype the module takes each in."""
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        wide = getattr(module, "float32_inputs", ())
        return {name: self._in(value, "float32" if name in wide else "bfloat16")
                for name, value in bound.arguments.items()}

    def _out(self, value: Any) -> np.ndarray:
        return self.ops.to_host(value[0] if isinstance(value, (list, tuple)) else value)

    @contextlib.contextmanager
    def _tap(self) -> Iterator[list[tuple[str, Any]]]:
        records: list[tuple[str, Any]] = []
        namer = CallNamer()

        def observe(module: Module, output: Any) -> None:
            if id(module) in self.names:
                records.append((namer(self.names[id(module)]), output))

        Module.observer = observe
        try:
            yield records
        finally:
            Module.observer = None

    def run(self, probes: list[Probe]) -> tuple[dict[str, np.ndarray], set[str]]:
        outputs: dict[str, np.ndarray] = {}
        finals: set[str] = set()
        with self._tap() as records:
            for probe in probes:
                module = self.modules[probe.module] if probe.module else self.model
                try:
                    module(**self._inputs(module, list(probe.args), dict(probe.kwargs)))
                    finished = True
                except Exception:  # noqa: BLE001  the layer that raised fails its local comparison, by name
                    finished = False
                outputs.update((name, self._out(output)) for name, output in records)
                if records and finished:
                    finals.add(records[-1][0])
                records.clear()
        return outputs, finals

    def call(self, module: str, args: list[Any], kwargs: dict[str, Any]) -> np.ndarray:
        layer = self.modules[module]
        args, kwargs = bind_recorded(type(layer).forward, type(layer).__name__, args, kwargs)
        return self._out(layer(**self._inputs(layer, args, kwargs)))
