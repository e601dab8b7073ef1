"""Objects that YAML names as "module:attribute" (runtime classes, checks, shape functions).

Specs name the code they need instead of the converter importing it: the converter stays below
the runtime and the reference in the import graph, and the spec remains the one place that says
which model a family or target is about.
"""
from __future__ import annotations

import importlib
from typing import Any

from vidport.converter.core.errors import VidportError


def named_object(path: str) -> Any:
    """The attribute `path` ("package.module:name") names; a clear error when it does not exist."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise VidportError(f"'{path}': not a 'module:attribute' name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise VidportError(f"'{path}': cannot import {module_name} ({err})") from err
    try:
        return getattr(module, attribute)
    except AttributeError as err:
        raise VidportError(f"'{path}': {module_name} has no {attribute}") from err
