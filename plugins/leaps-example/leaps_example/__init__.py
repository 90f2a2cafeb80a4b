"""leaps-example: a third-party leaps plugin.

leaps finds this module through the ``leaps`` entry-point group (see pyproject.toml) and calls
the two hooks below: one registers the adapter, the other contributes the registry file that
ships inside this package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from leaps.hookspecs import hookimpl
from leaps_example.tiny3d import Tiny3D, Tiny3DAdapter

__all__ = ["REGISTRY", "Tiny3D", "Tiny3DAdapter"]

REGISTRY = Path(__file__).with_name("registry.yaml")


@hookimpl
def leaps_register_adapters(register: Callable[[type], None]) -> None:
    register(Tiny3DAdapter)


@hookimpl
def leaps_register_models(register: Callable[[Any], None]) -> None:
    register(REGISTRY)
