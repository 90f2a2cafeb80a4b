"""The plugin host: loads every ``leaps`` entry point, built-in adapters included.

Each entry point is loaded inside its own ``try``: a plugin that fails to import, or that
implements a hook that does not exist (a misspelling), is skipped with one warning line naming
its distribution and the error. With ``LEAPS_STRICT_PLUGINS=1`` (what CI and the test suite
use) the same problem is an error instead.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from leaps import hookspecs
from leaps.errors import LeapsError

if TYPE_CHECKING:
    from leaps.adapter import Adapter

ENTRY_POINT_GROUP = "leaps"
STRICT_ENV = "LEAPS_STRICT_PLUGINS"


@dataclass
class PluginInfo:
    """One loaded plugin, as ``leaps plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _describe(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.name, "?"
    return dist.metadata["Name"] or ep.name, dist.version or "?"


class PluginHost:
    """pluggy's PluginManager plus what leaps needs on top: adapters by name, load warnings."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.adapters: dict[str, type[Adapter]] = {}
        self.adapter_provider: dict[str, str] = {}
        self.warnings: list[str] = []

    # -- loading -----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist, version = _describe(ep)
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a third-party module
                self._fail(f"plugin {ep.name!r} from {dist} {version} failed to import: "
                           f"{type(exc).__name__}: {exc}")
                continue
            self.add(plugin, ep.name, dist, version)

    def add(self, plugin: Any, name: str, distribution: str = "(in process)",
            version: str = "?") -> PluginInfo | None:
        """Register one plugin object and collect its adapters; returns None if it was skipped."""
        if name in self.plugins:
            raise LeapsError(f"two plugins are named {name!r} ({self.plugins[name].distribution} "
                             f"and {distribution}); uninstall one of them")
        self.pm.register(plugin, name=name)
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(plugin)
            known = [h for h in dir(self.pm.hook)
                     if h.startswith("leaps_") and getattr(self.pm.hook, h).has_spec()]
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, known, n=1)
                hints.append(hook + (f" (did you mean {close[0]}?)" if close else ""))
            self._fail(f"plugin {name!r} from {distribution} {version} implements unknown "
                       f"hook(s) {', '.join(hints)}; known hooks: {', '.join(sorted(known))}")
            return None
        info = PluginInfo(name=name, distribution=distribution, version=version,
                          module=getattr(plugin, "__name__", type(plugin).__name__),
                          hooks=sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
        self.plugins[name] = info

        def register(adapter_cls: type[Adapter]) -> None:
            self._register_adapter(adapter_cls, info)

        caller = self.pm.subset_hook_caller("leaps_register_adapters",
                                            remove_plugins=[p for p in self.pm.get_plugins()
                                                            if p is not plugin])
        try:
            caller(register=register)
        except LeapsError:
            self.remove(plugin, info)
            raise
        except Exception as exc:
            self.remove(plugin, info)
            self._fail(f"plugin {name!r} from {distribution} {version} failed while registering "
                       f"adapters: {type(exc).__name__}: {exc}")
            return None
        return info

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            pass
        else:
            return []
        return sorted(
            impl.name for impl in (self.pm.get_hookcallers(plugin) or [])
            if not impl.has_spec()
        )

    def remove(self, plugin: Any, info: PluginInfo) -> None:
        """Unregister ``plugin`` and forget the adapters it provided."""
        self.pm.unregister(plugin)
        for adapter in info.adapters:
            self.adapters.pop(adapter, None)
            self.adapter_provider.pop(adapter, None)
        self.plugins.pop(info.name, None)

    def _register_adapter(self, adapter_cls: type[Adapter], info: PluginInfo) -> None:
        from leaps.adapter import Adapter

        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
            raise LeapsError(f"plugin {info.name!r} ({info.distribution}) registered "
                             f"{adapter_cls!r}, which is not a leaps.adapter.Adapter subclass")
        name = getattr(adapter_cls, "name", "")
        if not isinstance(name, str) or name.count(".") != 1 or not all(name.split(".")):
            raise LeapsError(f"plugin {info.name!r} ({info.distribution}) registered adapter "
                             f"{adapter_cls.__name__} with name {name!r}; adapter names are "
                             "'<plugin>.<family>', e.g. 'mmaction.swin'")
        if name in self.adapters:
            other = self.adapter_provider[name]
            raise LeapsError(f"adapter {name!r} is provided twice: by plugin {other!r} "
                             f"({self.plugins[other].distribution}) and by plugin {info.name!r} "
                             f"({info.distribution}); uninstall one of them")
        self.adapters[name] = adapter_cls
        self.adapter_provider[name] = info.name
        info.adapters.append(name)

    def _fail(self, message: str) -> None:
        if strict():
            raise LeapsError(message + f" ({STRICT_ENV} is set)")
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)

    # -- lookups -----------------------------------------------------------------------
    def adapter(self, name: str) -> type[Adapter]:
        """The adapter class called ``name``; an unknown name errors with close matches."""
        try:
            return self.adapters[name]
        except KeyError:
            raise LeapsError(unknown_name_message("adapter", name, sorted(self.adapters),
                                                  "`leaps plugins` lists what provides them")
                             ) from None


def unknown_name_message(kind: str, name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown {kind} {name!r}; {hint}installed: {', '.join(known) or 'none'} ({where})"


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded from entry points on first use."""
    global _HOST
    if _HOST is None:
        host = PluginHost()
        host.load_entry_points()
        _HOST = host
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (and the registry built from them); the next use reloads."""
    global _HOST
    _HOST = None
    from leaps import registry

    registry.reset_registry()
