"""The hooks a leaps plugin may implement.

A plugin is a module (or object) exposed through the ``leaps`` entry-point group. It
implements any of the hooks below, decorated with :data:`hookimpl`. Every hook is handed a
``register`` callback, so a plugin can contribute any number of things in one call and hooks
can grow keyword arguments later without breaking existing plugins (pluggy passes an
implementation only the arguments it names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("leaps")
hookimpl = pluggy.HookimplMarker("leaps")


@hookspec
def leaps_register_adapters(register: Callable[[type], None]) -> None:
    """Register adapter classes, one ``register(AdapterSubclass)`` call each.

    Called once, when the plugin manager first loads. Each class is a subclass of
    :class:`leaps.adapter.Adapter` whose ``name`` is ``"<plugin>.<family>"``
    (e.g. ``"mmaction.swin"``). Registering a name another plugin already registered is an
    error naming both plugins.
    """


@hookspec
def leaps_register_models(register: Callable[[str | dict[str, Any]], None]) -> None:
    """Contribute registry entries, one ``register(...)`` call per YAML file or mapping.

    Called once, when the registry is first loaded. ``register`` accepts the path of a YAML
    file shaped like the project's ``registry.yaml`` (a top-level ``models:`` mapping), or such
    a mapping itself. Entries are validated like the built-in ones; a model name that is
    already taken is an error naming both sources.
    """
