"""leaps: see what video action-recognition models learned.

LEAPS model inversion (Stergiou & Deligiannis, ICCV 2023) and attribution for any video
model family, through adapter plugins. Heavy modules load on first use, so importing
``leaps`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LeapsError": "leaps.errors",
    "Adapter": "leaps.adapter",
    "InputSpec": "leaps.adapter",
    "Tap": "leaps.adapter",
    "NormLayer": "leaps.adapter",
    "VideoClassifier": "leaps.adapter",
    "ModelSpec": "leaps.registry",
    "load_registry": "leaps.registry",
    "build_model": "leaps.registry",
    "hookimpl": "leaps.hookspecs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leaps' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = sorted(_LAZY) + ["__version__"]
