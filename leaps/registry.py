"""The model registry: ``registry.yaml`` (and plugins' contributions) -> validated ModelSpecs.

Each entry names its adapter, the architecture arguments the adapter builds from, the input
spec, the label set, where official weights live, the default verifier, and the LEAPS
hyperparameters of the paper's Table S1. Entries are validated when loaded: an unknown adapter,
a missing or ill-typed field, or an unknown field is an error naming the entry and the field.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from leaps.errors import LeapsError

if TYPE_CHECKING:
    from leaps.adapter import InputSpec, VideoClassifier

SPECIAL_VERIFIERS = ("self", "none")


@dataclass(frozen=True)
class LeapsParams:
    """Table S1 of the paper: priming weight of the first and last tap, regulariser weight."""

    lambda_1: float
    lambda_L: float
    r: float


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's weights come from: a URL with its sha256 (or a prefix of it, as
    torch.hub file names carry), or a path (relative to the registry file that names it)."""

    url: str | None = None
    sha256: str | None = None
    path: str | None = None

    @property
    def source(self) -> str:
        return self.url or self.path or ""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    adapter: str
    arch: dict[str, Any]
    frames: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    value_range: float
    labels: str | tuple[str, ...]
    verifier: str
    leaps: LeapsParams
    checkpoint: Checkpoint | None = None
    paper: str | None = None
    description: str = ""
    reduced: dict[str, Any] = field(default_factory=dict)
    mirrors: tuple[tuple[str, str], ...] = ()
    opposites: tuple[tuple[str, str], ...] = ()
    unavailable: str | None = None
    stimuli: str | None = None
    source: str = ""

    def label_names(self) -> tuple[str, ...]:
        return load_labels(self.labels, Path(self.source).parent if self.source else None)

    def input_spec(self, labels: tuple[str, ...] | None = None) -> InputSpec:
        from leaps.adapter import InputSpec

        return InputSpec(frames=self.frames, size=self.size, mean=self.mean, std=self.std,
                         value_range=self.value_range,
                         labels=tuple(labels) if labels is not None else self.label_names())

    def at_reduced_size(self) -> ModelSpec:
        """This entry at the reduced size its ``reduced`` field gives (for tests): its frames
        and size, and ``reduced.arch`` merged into ``arch`` key by key at every depth, so that
        a reduced variant overrides single nested options (one of ``cfg_options``) and keeps
        the entry's others."""
        arch = merge_nested(self.arch, self.reduced.get("arch", {}))
        return replace(self, frames=self.reduced.get("frames", self.frames),
                       size=self.reduced.get("size", self.size), arch=arch)

    def stimulus_files(self, label: str) -> list[Path]:
        """The entry's bundled stimulus videos of class ``label`` (``<label>_<n>.<ext>`` in its
        ``stimuli`` folder), or none."""
        if self.stimuli is None:
            return []
        return stimulus_files(Path(self.source).parent / self.stimuli, label)

    def checkpoint_path(self) -> Path | None:
        if self.checkpoint is None or self.checkpoint.path is None:
            return None
        return (Path(self.source).parent / self.checkpoint.path).resolve()


def stimulus_files(folder: Path, label: str) -> list[Path]:
    """The stimulus videos of class ``label`` in ``folder``: files ``<label>_<n>.<ext>``."""
    return sorted(p for p in folder.glob(f"{glob.escape(label)}_*.*")
                  if p.stem[len(label) + 1:].isdigit())


def merge_nested(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; where both hold a mapping under one key, the two
    mappings are merged the same way instead of the override replacing it. Neither argument
    is modified."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- label sets -------------------------------------------------------------------------
def load_labels(labels: str | tuple[str, ...] | list[str], base: Path | None = None
                ) -> tuple[str, ...]:
    """A label set: a list, a bundled set name (``kinetics400``), or a text file, one a line.

    Files are UTF-8; blank lines are skipped. A line that is not UTF-8, or a class name given
    twice, is an error naming the file and the line numbers."""
    if isinstance(labels, (tuple, list)):
        return _unique_names([(str(name), i) for i, name in enumerate(labels, 1)],
                             "the label list", "entries")
    bundled = resources.files("leaps") / "labels" / f"{labels}.txt"
    if bundled.is_file():
        source, data = str(labels), bundled.read_bytes()
    else:
        path = Path(labels)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise LeapsError(f"label set {labels!r} is neither a bundled set "
                             f"({', '.join(bundled_label_sets())}) nor an existing file")
        try:
            source, data = str(labels), path.read_bytes()
        except OSError as exc:
            raise LeapsError(f"cannot read label file {labels}: {exc.strerror or exc}") from None
    names = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise LeapsError(
                f"label file {source} line {number} is not UTF-8 (byte "
                f"0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
            ) from None
        if line:
            names.append((line.removeprefix("\ufeff"), number))
    if not names:
        raise LeapsError(f"label file {labels} is empty; write one class name per line")
    return _unique_names(names, f"label file {source}", "lines")


def _unique_names(names: list[tuple[str, int]], source: str, unit: str) -> tuple[str, ...]:
    """The names, in order, if none repeats; else an error naming the repeats' positions."""
    where: dict[str, list[int]] = {}
    for name, number in names:
        where.setdefault(name, []).append(number)
    repeated = {name: numbers for name, numbers in where.items() if len(numbers) > 1}
    if repeated:
        listed = "; ".join(f"{name!r} on {unit} {', '.join(map(str, numbers))}"
                           for name, numbers in list(repeated.items())[:3])
        more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
        raise LeapsError(f"{source} repeats class names: {listed}{more}; name each class "
                         "once, in the order of the model's classifier outputs")
    return tuple(name for name, _ in names)


def bundled_label_sets() -> list[str]:
    folder = resources.files("leaps") / "labels"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


# -- validation -------------------------------------------------------------------------
_FIELDS = {"adapter", "arch", "input", "labels", "verifier", "leaps", "checkpoint", "paper",
           "description", "reduced", "mirrors", "opposites", "unavailable", "stimuli"}
_INPUT_FIELDS = {"frames", "size", "mean", "std", "value_range"}


class _Entry:
    """Field access for one raw entry that turns every problem into a precise error."""

    def __init__(self, name: str, raw: Any, source: str) -> None:
        self.name, self.raw, self.source = name, raw, source
        if not isinstance(raw, dict):
            self.fail("", f"must be a mapping, got {type(raw).__name__}")

    def fail(self, key: str, problem: str) -> None:
        where = f", field {key!r}" if key else ""
        raise LeapsError(f"registry entry {self.name!r} ({self.source}){where}: {problem}; "
                         "fix the entry (see registry.yaml for the schema)")

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True,
            default: Any = None, mapping: dict[str, Any] | None = None) -> Any:
        src = self.raw if mapping is None else mapping
        if key not in src or src[key] is None:
            if required:
                self.fail(key, "is missing")
            return default
        value = src[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(key, f"must be {names}, got {value!r}")
        return value

    def triple(self, key: str, mapping: dict[str, Any], positive: bool = False
               ) -> tuple[float, float, float]:
        value = self.get(key, list, mapping=mapping)
        if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            self.fail(f"input.{key}", f"must be three numbers (R, G, B), got {value!r}")
        if positive and min(value) <= 0:
            self.fail(f"input.{key}", f"must be positive, got {value!r}")
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    def pairs(self, key: str) -> tuple[tuple[str, str], ...]:
        value = self.get(key, list, required=False, default=[])
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
                   for p in value):
            self.fail(key, "must be a list of [class, class] pairs")
        return tuple((a, b) for a, b in value)


def parse_entry(name: str, raw: Any, source: str) -> ModelSpec:
    """Validate one raw YAML entry and turn it into a ModelSpec."""
    entry = _Entry(name, raw, source)
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_FIELDS), n=1)
        entry.fail(unknown[0], "is not a registry field"
                   + (f" (did you mean {close[0]!r}?)" if close else ""))
    inp = entry.get("input", dict)
    bad = sorted(set(inp) - _INPUT_FIELDS)
    if bad:
        entry.fail(f"input.{bad[0]}", f"is not an input field ({', '.join(sorted(_INPUT_FIELDS))})")
    frames = entry.get("frames", int, mapping=inp)
    size = entry.get("size", int, mapping=inp)
    if frames < 1 or size < 1:
        entry.fail("input", f"frames and size must be positive, got {frames} and {size}")
    leaps_raw = entry.get("leaps", dict)
    params = LeapsParams(*(entry.get(k, float, mapping=leaps_raw)
                           for k in ("lambda_1", "lambda_L", "r")))
    if min(params.lambda_1, params.lambda_L, params.r) < 0:
        entry.fail("leaps", f"weights must be >= 0, got {params}")
    checkpoint = None
    ck = entry.get("checkpoint", dict, required=False)
    if ck is not None:
        extra = sorted(set(ck) - {"url", "sha256", "path"})
        if extra or not (ck.get("url") or ck.get("path")):
            entry.fail("checkpoint", "needs 'url' (with 'sha256') or 'path', and nothing else")
        if ck.get("url") and not ck.get("sha256"):
            entry.fail("checkpoint.sha256", "is missing: a URL needs its sha256 (or prefix)")
        checkpoint = Checkpoint(url=ck.get("url"), sha256=ck.get("sha256"), path=ck.get("path"))
    labels = entry.get("labels", (str, list))
    reduced = entry.get("reduced", dict, required=False, default={})
    for key in ("frames", "size"):
        if key in reduced:
            entry.get(key, int, mapping=reduced)
    if "arch" in reduced:
        entry.get("arch", dict, mapping=reduced)
    return ModelSpec(
        name=name,
        adapter=entry.get("adapter", str),
        arch=entry.get("arch", dict, required=False, default={}),
        frames=frames, size=size,
        mean=entry.triple("mean", inp), std=entry.triple("std", inp, positive=True),
        value_range=entry.get("value_range", float, required=False, default=1.0, mapping=inp),
        labels=tuple(labels) if isinstance(labels, list) else labels,
        verifier=entry.get("verifier", str),
        leaps=params,
        checkpoint=checkpoint,
        paper=entry.get("paper", str, required=False),
        description=entry.get("description", str, required=False, default=""),
        reduced=reduced,
        mirrors=entry.pairs("mirrors"),
        opposites=entry.pairs("opposites"),
        unavailable=entry.get("unavailable", str, required=False),
        stimuli=entry.get("stimuli", str, required=False),
        source=source,
    )


# -- the registry -----------------------------------------------------------------------
class Registry:
    """All model entries: the project's registry.yaml plus what plugins contribute."""

    def __init__(self) -> None:
        self.models: dict[str, ModelSpec] = {}

    def add_file(self, path: str | Path) -> None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LeapsError(f"cannot read registry file {path}: {first}; fix its YAML") from None
        self.add_mapping(data, str(path))

    def add_mapping(self, data: Any, source: str) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise LeapsError(f"registry {source} must have a top-level 'models:' mapping of "
                             "entries")
        for name, raw in data["models"].items():
            if name in self.models:
                raise LeapsError(f"model {name!r} is defined twice: in {self.models[name].source}"
                                 f" and in {source}; rename one of them")
            self.models[name] = parse_entry(str(name), raw, source)

    def add_plugin(self, name: str, plugin: Any, host: Any) -> None:
        """The entries of one plugin's ``leaps_register_models`` hook, all or none: a hook
        that raises, an unreadable registry file, an invalid entry or one whose name is taken
        skips that plugin's entries with a warning naming the plugin and the problem (an error
        under ``LEAPS_STRICT_PLUGINS``); the other plugins' entries are kept."""
        hook = host.pm.hook.leaps_register_models
        if not any(impl.plugin is plugin for impl in hook.get_hookimpls()):
            return
        staged = Registry()
        staged.models = dict(self.models)

        def register(item: str | Path | dict[str, Any]) -> None:
            if isinstance(item, dict):
                staged.add_mapping(item, f"plugin {name!r}'s registry mapping")
            else:
                staged.add_file(item)

        caller = host.pm.subset_hook_caller(
            "leaps_register_models", remove_plugins=[p for p in host.pm.get_plugins()
                                                     if p is not plugin])
        try:
            caller(register=register)
            staged.check_references(sorted(host.adapters),
                                    only=set(staged.models) - set(self.models))
        except Exception as exc:  # a hook that raises or a bad file: this plugin's problem
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = text if isinstance(exc, LeapsError) else \
                f"raised {type(exc).__name__}: {text}".rstrip(": ")
            host.plugin_problem(name, f"contributes no models: {reason}")
            return
        self.models = staged.models

    def check_references(self, adapters: list[str], only: set[str] | None = None,
                         failed: dict[str, str] | None = None) -> None:
        """Every entry (of ``only``, if given) names an installed adapter and a known
        verifier. An entry of an adapter whose plugin is in ``failed`` (plugin -> why it did
        not load) is kept as unavailable, with that reason."""
        for spec in list(self.models.values()):
            if only is not None and spec.name not in only:
                continue
            plugin = spec.adapter.split(".")[0]
            if spec.adapter not in adapters and failed and plugin in failed:
                self.models[spec.name] = replace(spec, unavailable=(
                    f"its adapter plugin {plugin!r} did not load ({failed[plugin]}); "
                    "`leaps plugins` shows it"))
                continue
            if spec.adapter not in adapters:
                close = difflib.get_close_matches(spec.adapter, adapters, n=2)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise LeapsError(f"registry entry {spec.name!r} ({spec.source}), field 'adapter':"
                                 f" unknown adapter {spec.adapter!r}{hint}; installed adapters: "
                                 f"{', '.join(adapters)}")
            if spec.verifier not in SPECIAL_VERIFIERS and spec.verifier not in self.models:
                raise LeapsError(f"registry entry {spec.name!r} ({spec.source}), field "
                                 f"'verifier': {spec.verifier!r} is not a registry model, "
                                 f"'self' or 'none'")

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            from leaps.plugins import unknown_name_message

            raise LeapsError(unknown_name_message("model", name, sorted(self.models),
                                                  "`leaps models` lists them")) from None

    def default_for_adapter(self, adapter: str) -> ModelSpec:
        """The first usable entry of an adapter (what ``--adapter NAME`` alone selects)."""
        candidates = [s for s in self.models.values() if s.adapter == adapter]
        usable = [s for s in candidates if s.unavailable is None]
        if not usable:
            raise LeapsError(f"adapter {adapter!r} has no usable registry entry; pass --model or "
                             "add one to registry.yaml")
        return usable[0]

    def resolve(self, model: str | None = None, adapter: str | None = None) -> ModelSpec:
        """A model given by name, by adapter (its default entry), or both (they must agree)."""
        from leaps.plugins import get_host

        if model is None and adapter is None:
            raise LeapsError("name a model (--model NAME) or an adapter (--adapter NAME); "
                             "`leaps models` lists both")
        if adapter is not None:
            get_host().adapter(adapter)
        if model is None:
            return self.default_for_adapter(adapter)  # type: ignore[arg-type]
        spec = self.get(model)
        if adapter is not None and spec.adapter != adapter:
            raise LeapsError(f"model {model!r} uses adapter {spec.adapter!r}, not {adapter!r}; "
                             "drop --adapter or pick a model of that adapter")
        return spec


def missing_requirements(spec: ModelSpec) -> str | None:
    """Why ``spec`` cannot be built here (a missing library, with the pip line), or None."""
    if spec.unavailable:
        return spec.unavailable
    from leaps.plugins import get_host

    host = get_host()
    if spec.adapter in host.clashes:
        return host.clash_message(spec.adapter)
    adapter = host.adapter(spec.adapter)
    missing = list(dict.fromkeys(requirement for module, requirement in adapter.requires.items()
                                 if not _importable(module)))
    if missing:
        return (f"needs {', '.join(adapter.requires)}: pip install "
                + " ".join(f"'{requirement}'" for requirement in missing))
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


_REGISTRY: Registry | None = None
REGISTRY_ENV = "LEAPS_REGISTRY"
_EXTRA_FILES: list[Path] = []


def registry_files() -> list[Path]:
    """The registry files added to the built-in one: ``LEAPS_REGISTRY`` (a path list, joined
    by ``os.pathsep``) and those given with ``--registry`` (:func:`add_registry_files`)."""
    import os

    listed = [Path(p) for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p.strip()]
    for path in listed:
        if not path.is_file():
            raise LeapsError(f"{REGISTRY_ENV} names {path}, which is not a file; fix the "
                             "variable (registry YAML files joined by "
                             f"{os.pathsep!r})")
    files = []
    for path in [*listed, *_EXTRA_FILES]:
        if path.resolve() not in [f.resolve() for f in files]:
            files.append(path)
    return files


def add_registry_files(paths: list[str | Path] | tuple[str | Path, ...]) -> None:
    """Add registry YAML files (the schema of registry.yaml) to the registry, as ``--registry
    FILE`` does; the registry is loaded again with them on its next use."""
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise LeapsError(f"registry file {path} does not exist; pass a YAML file with a "
                             "'models:' mapping (the schema of registry.yaml) to --registry")
        if path.resolve() not in [p.resolve() for p in _EXTRA_FILES]:
            _EXTRA_FILES.append(path.resolve())
    reset_registry()


def clear_registry_files() -> None:
    """Forget the files :func:`add_registry_files` added (the registry loads again)."""
    _EXTRA_FILES.clear()
    reset_registry()


def load_registry() -> Registry:
    """The registry (built-in file + plugin contributions + :func:`registry_files`),
    validated, loaded once."""
    global _REGISTRY
    if _REGISTRY is None:
        from leaps.plugins import get_host

        host = get_host()
        registry = Registry()
        registry.add_file(Path(str(resources.files("leaps") / "registry.yaml")))
        # A built-in adapter plugin that did not load (a broken install of its library) makes
        # its own entries unusable, not the registry.
        registry.check_references(sorted(host.adapters), failed={
            info.name: info.problems[0] for info in host.failed if info.problems})
        for name, plugin in host.pm.list_name_plugin():
            if name is None or host.pm.is_blocked(name):
                continue
            registry.add_plugin(name, plugin, host)
        before = set(registry.models)
        for path in registry_files():  # the user's own files: a problem there is an error
            registry.add_file(path.resolve())
        registry.check_references(sorted(host.adapters), only=set(registry.models) - before)
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    global _REGISTRY
    _REGISTRY = None


def build_model(model: str | None = None, *, adapter: str | None = None,
                checkpoint: str | Path | None = None, labels: str | Path | None = None,
                reduced: bool = False, device: str | None = None,
                model_config: str | Path | None = None) -> VideoClassifier:
    """Build a registry model (by name, or an adapter's default) as a VideoClassifier.

    ``model_config`` is instead the model's own config file (an mmaction2 config;
    :func:`leaps.model_files.register_config_model`, ``adapter`` then forces the adapter).

    ``checkpoint`` loads weights (a path; ``"registry"`` for the entry's own checkpoint, which
    is also the default for an entry that ships its weights as a file: the demo zoo);
    ``labels`` (a label file) replaces the entry's classes for a fine-tuned model;
    ``reduced`` builds the entry at its small test size.
    """
    from leaps.model_files import resolve_model_options
    from leaps.plugins import get_host

    model, adapter, _ = resolve_model_options(model, adapter, model_config, labels=labels)
    spec = load_registry().resolve(model, adapter)
    reason = missing_requirements(spec)
    if reason:
        raise LeapsError(f"model {spec.name!r} is not usable here: {reason}")
    if reduced:
        spec = spec.at_reduced_size()
    label_names = load_labels(str(labels)) if labels is not None else None
    if checkpoint == "registry" or (checkpoint is None and spec.checkpoint_path() is not None):
        checkpoint = fetch_checkpoint(spec)
    classifier = get_host().adapter(spec.adapter)().build(spec, checkpoint, label_names)
    if device is not None:
        classifier.to(device)
    return classifier


def fetch_checkpoint(spec: ModelSpec) -> Path:
    """The entry's checkpoint file: its bundled path, or its URL downloaded into the torch hub
    cache and checked against the registry's sha256 (only ever when the user asks for it)."""
    if spec.checkpoint is None:
        raise LeapsError(f"model {spec.name!r} lists no checkpoint; pass --checkpoint PATH")
    path = spec.checkpoint_path()
    if path is not None:
        return path
    import torch.hub

    url = spec.checkpoint.url or ""
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=spec.checkpoint.sha256)
        except Exception as exc:
            raise LeapsError(f"cannot download {url} ({type(exc).__name__}: {exc}); download it "
                             "elsewhere and pass the file with --checkpoint PATH") from None
    return target
