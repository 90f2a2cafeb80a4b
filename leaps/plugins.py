"""The plugin host: loads every ``leaps`` entry point, built-in adapters included.

Each entry point is loaded inside its own ``try``: a plugin that fails to import, implements a
hook that does not exist (a misspelling), raises in a hook or registers something that is not
an adapter is skipped with one warning line naming its distribution and the error; so are the
registry entries of a plugin whose registry file or mapping is invalid (see
:func:`leaps.registry.load_registry`). An adapter name that two plugins provide is unusable
(a command that needs it gets the error naming both providers), every other one works. The
problems are kept on the host, so ``leaps plugins`` shows them. With ``LEAPS_STRICT_PLUGINS=1``
(what CI and the test suite use) each problem is an error instead.
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
    # What went wrong with it, one line each (empty: it loaded whole). A plugin that failed to
    # load is listed with its problem and nothing else.
    problems: list[str] = field(default_factory=list)
    loaded: bool = True


def strict_mode() -> bool:
    """Whether ``LEAPS_STRICT_PLUGINS`` makes every plugin problem an error."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _describe(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.name, "?"
    return dist.metadata["Name"] or ep.name, dist.version or "?"


class PluginHost:
    """pluggy's PluginManager plus what leaps needs on top: adapters by name, load warnings."""

    def __init__(self, strict: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: list[PluginInfo] = []  # plugins that did not load, with the reason
        self.adapters: dict[str, type[Adapter]] = {}
        self.adapter_provider: dict[str, str] = {}
        # adapter name -> the plugins that each provide it (two or more: the name is unusable)
        self.clashes: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self.strict = strict_mode() if strict is None else strict
        self._classes: dict[tuple[str, str], type[Adapter]] = {}  # (plugin, adapter) -> class

    # -- loading -----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist, version = _describe(ep)
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a third-party module
                self._skip(ep.name, dist, version, "failed to import: "
                           f"{type(exc).__name__}: {_one_line(exc)}")
                continue
            self.add(plugin, ep.name, dist, version)

    def add(self, plugin: Any, name: str, distribution: str = "(in process)",
            version: str = "?") -> PluginInfo | None:
        """Register one plugin object and collect its adapters; returns None if it was skipped."""
        if name in self.plugins:
            self._skip(name, distribution, version, f"has the name of plugin {name!r} of "
                       f"{self.plugins[name].distribution} (two plugins are named {name!r}); "
                       "uninstall one of them")
            return None
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
            self._skip(name, distribution, version, f"implements unknown hook(s) "
                       f"{', '.join(hints)}; known hooks: {', '.join(sorted(known))}")
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
        except Exception as exc:  # a hook that raises, or registers something unusable
            self.remove(plugin, info)
            reason = (str(exc) if isinstance(exc, LeapsError) else
                      f"{type(exc).__name__}: {_one_line(exc)}")
            self._skip(name, distribution, version,
                       f"failed while registering adapters: {reason}")
            return None
        for adapter in [a for a in info.adapters if name in self.clashes.get(a, ())]:
            message = self.clash_message(adapter)
            if self.strict:
                self.remove(plugin, info)
            else:
                for other in self.clashes[adapter]:
                    if other != name and other in self.plugins:
                        self.plugins[other].problems.append(message)
            self._fail(message, plugin=name)
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
        """Unregister ``plugin`` and forget the adapters it provided (a name it shared with
        another plugin is that plugin's again)."""
        self.pm.unregister(plugin)
        for adapter in info.adapters:
            providers = self.clashes.get(adapter)
            if providers and info.name in providers:
                providers.remove(info.name)
                if len(providers) == 1:
                    del self.clashes[adapter]
                if self.adapter_provider.get(adapter) != info.name:
                    continue
                rest = self.plugins.get(providers[0])
                owner = self._classes.get((providers[0], adapter))
                if rest is not None and owner is not None:
                    self.adapters[adapter], self.adapter_provider[adapter] = owner, rest.name
                    continue
            self.adapters.pop(adapter, None)
            self.adapter_provider.pop(adapter, None)
        for adapter in info.adapters:
            self._classes.pop((info.name, adapter), None)
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
        if name in info.adapters:
            return  # the same name twice from one plugin: once is enough
        self._classes[(info.name, name)] = adapter_cls
        info.adapters.append(name)
        if name in self.adapters:
            # Neither provider wins: the name stays unusable until one is uninstalled.
            providers = self.clashes.setdefault(name, [self.adapter_provider[name]])
            providers.append(info.name)
            return
        self.adapters[name] = adapter_cls
        self.adapter_provider[name] = info.name

    def clash_message(self, adapter: str) -> str:
        providers = self.clashes[adapter]
        named = " and by ".join(
            f"plugin {p!r} ({self.plugins[p].distribution if p in self.plugins else '?'})"
            for p in providers)
        return (f"adapter {adapter!r} is provided twice: by {named}; uninstall one of them "
                "(`leaps plugins` lists them)")

    def _skip(self, name: str, distribution: str, version: str, reason: str) -> None:
        """A plugin that could not be loaded: warn (or, strict, fail) and remember why."""
        self.failed.append(PluginInfo(name=name, distribution=distribution, version=version,
                                      module="", loaded=False, problems=[reason]))
        self._fail(f"plugin {name!r} from {distribution} {version} {reason}")

    def _fail(self, message: str, plugin: str | None = None, problem: str | None = None
              ) -> None:
        """One plugin problem: an error under ``LEAPS_STRICT_PLUGINS``, else a warning line;
        ``plugin`` (a loaded one) keeps it (or ``problem``) among its problems for
        ``leaps plugins``."""
        if plugin is not None and plugin in self.plugins:
            self.plugins[plugin].problems.append(problem or message)
        if self.strict:
            raise LeapsError(message + f" ({STRICT_ENV} is set)")
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)

    def plugin_problem(self, plugin: str, reason: str) -> None:
        """A problem of a loaded plugin found later (its registry entries): warn or fail."""
        info = self.plugins.get(plugin)
        where = f"plugin {plugin!r} from {info.distribution} {info.version}" if info else \
            f"plugin {plugin!r}"
        self._fail(f"{where} {reason}", plugin=plugin, problem=reason)

    # -- lookups -----------------------------------------------------------------------
    def adapter(self, name: str) -> type[Adapter]:
        """The adapter class called ``name``; an unknown name errors with close matches, a
        name two plugins provide with both of them."""
        if name in self.clashes:
            raise LeapsError(self.clash_message(name))
        try:
            return self.adapters[name]
        except KeyError:
            raise LeapsError(unknown_name_message("adapter", name, sorted(self.adapters),
                                                  "`leaps plugins` lists what provides them")
                             ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unknown_name_message(kind: str, name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown {kind} {name!r}; {hint}installed: {', '.join(known) or 'none'} ({where})"


_HOST: PluginHost | None = None


def get_host(tolerant: bool = False) -> PluginHost:
    """The process-wide plugin host, loaded from entry points on first use. ``tolerant``
    (``leaps plugins``) loads it with every problem a warning, whatever
    ``LEAPS_STRICT_PLUGINS`` says, so that the problems can be shown."""
    global _HOST
    if _HOST is None:
        host = PluginHost(strict=False if tolerant else None)
        host.load_entry_points()
        _HOST = host
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (and the registry built from them); the next use reloads."""
    global _HOST
    _HOST = None
    from leaps import registry

    registry.reset_registry()
