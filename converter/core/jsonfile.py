"""JSON from files a stranger may have written: size-bounded, strict UTF-8, no repeated keys.

Python's json keeps the last of two equal keys; a safetensors header or an index that says two
things about one tensor is damaged or hostile, so a repeated key is refused instead. `NaN` and
`Infinity` are not JSON and are refused too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError

MAX_JSON_FILE = 64 * 1024 * 1024


class _Repeated(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Repeated(f"the key {key!r} appears twice")
        found[key] = value
    return found


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes | str, where: str) -> Any:
    """Parse JSON text (bytes must be UTF-8); one VidportError line naming `where` on any fault."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        return json.loads(text, object_pairs_hook=_no_repeats, parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise VidportError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise VidportError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except _Repeated as err:
        raise VidportError(f"{where}: {err}; refusing to guess which one is meant") from err
    except (ValueError, RecursionError) as err:  # NaN / Infinity; arrays nested thousands deep
        raise VidportError(f"{where}: not valid JSON ({err})") from err


def read_json_object(path: Path, limit: int = MAX_JSON_FILE) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index), at most `limit` bytes."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as err:
        raise VidportError(f"{path}: cannot read ({err.strerror or err})") from err
    if len(raw) > limit:
        raise VidportError(f"{path}: larger than {limit:,} bytes; not a config or index file")
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise VidportError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data
