"""Your own model from its files: a library's config file (``--config``) as a registry entry.

A user of a training library holds a config file, a checkpoint it trained and a class list.
:func:`register_config_model` asks every installed adapter whether it builds the model the
config describes (:meth:`leaps.adapter.Adapter.read_config`); the one that does reads the input
spec from the file, and the model is added to the loaded registry under ``config:<file stem>``,
so everything that takes a registry model (invert, explain, layers, evaluate) takes it too.
Its verifier is the model itself and its LEAPS weights are those of its adapter's first
registry entry (its family's Table S1 values). :func:`config_record` is what run.json keeps of
it, :func:`restore_model` rebuilds it from that record (``--resume``, ``leaps evaluate``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaps.errors import LeapsError

if TYPE_CHECKING:
    from leaps.adapter import ConfigModel
    from leaps.registry import ModelSpec

CONFIG_PREFIX = "config:"
# LEAPS weights for a family without any registry entry (the paper's most common setting).
DEFAULT_LEAPS = (0.75, 0.1, 1e-3)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_config(path: Path, adapter: str | None = None, frames: int | None = None,
                size: int | None = None) -> tuple[str, ConfigModel]:
    """The adapter that builds the model of config file ``path`` and what it read there.

    With ``adapter`` that adapter is asked alone (and takes a config of its library whatever
    architecture it builds); otherwise every installed adapter is asked in name order, and the
    first that builds it wins. None taking it is an error naming the installed adapters (or the
    reason an adapter gave for a config of its library it cannot use)."""
    from leaps.plugins import get_host

    host = get_host()
    if adapter is not None:
        model = host.adapter(adapter).read_config(path, frames, size, forced=True)
        if model is None:
            raise LeapsError(f"adapter {adapter} does not read {path.name} as a config of its "
                             "library; drop --adapter, or pass a config file it reads")
        return adapter, model
    refusal: LeapsError | None = None
    for name in sorted(host.adapters):
        try:
            model = host.adapters[name].read_config(path, frames, size)
        except LeapsError as exc:
            refusal = refusal or exc
            continue
        if model is not None:
            return name, model
    if refusal is not None:
        raise refusal
    from leaps.adapter import Adapter

    readers = sorted(name for name, cls in host.adapters.items()
                     if cls.read_config.__func__ is not Adapter.read_config.__func__)
    raise LeapsError(f"no installed adapter reads {path} as the config of a model it builds "
                     f"(adapters that read config files: {', '.join(readers) or 'none'}; "
                     f"installed: {', '.join(sorted(host.adapters))}); install the plugin of "
                     "its library, or use --model/--adapter with --checkpoint")


def register_config_model(path: str | Path, *, adapter: str | None = None,
                          frames: int | None = None, size: int | None = None,
                          labels: str | Path | None = None,
                          on_warning: Callable[[str], None] = _warn) -> ModelSpec:
    """Add the model of config file ``path`` to the loaded registry and return its entry.

    ``adapter`` forces an adapter (else it is chosen from what the file builds);
    ``frames``/``size`` override the input size the file gives; ``labels`` (a file, one class
    a line) names the classes, whose count must equal the classifier's; without it the classes
    are ``class_0 .. class_{K-1}`` for the K outputs the file gives, with a warning."""
    from leaps.registry import LeapsParams, ModelSpec, load_labels, load_registry

    path = Path(path).expanduser()
    if not path.is_file():
        raise LeapsError(f"config file {path} does not exist; pass your model's config file "
                         "(e.g. the one training wrote into its work dir) to --config")
    path = path.resolve()
    adapter_name, model = read_config(path, adapter, frames, size)
    names = load_labels(str(labels)) if labels is not None else None
    if names is not None and model.num_classes is not None and len(names) != model.num_classes:
        raise LeapsError(f"label file {labels} names {len(names)} classes but {path.name} gives "
                         f"the classifier {model.num_classes} outputs; list one class per output "
                         "in order, one a line")
    if names is None:
        if model.num_classes is None:
            raise LeapsError(f"{path.name} does not say how many classes the model has; pass "
                             "--labels FILE (one class name a line)")
        count = model.num_classes
        names = tuple(f"class_{i}" for i in range(count))
        on_warning(f"no --labels: the {count} classes of {path.name} are called class_0 .. "
                   f"class_{count - 1}; pass --labels FILE (one class name a line) to name them")
    registry = load_registry()
    family = [s for s in registry.models.values()
              if s.adapter == adapter_name and not s.name.startswith(CONFIG_PREFIX)]
    params = family[0].leaps if family else LeapsParams(*DEFAULT_LEAPS)
    name = CONFIG_PREFIX + path.stem
    taken = registry.models.get(name)
    number = 2
    while taken is not None and taken.source != str(path):
        name = f"{CONFIG_PREFIX}{path.stem}~{number}"
        taken, number = registry.models.get(name), number + 1
    spec = ModelSpec(
        name=name, adapter=adapter_name, arch=model.arch, frames=model.frames, size=model.size,
        mean=model.mean, std=model.std, value_range=model.value_range, labels=names,
        verifier="self", leaps=params, description=f"{model.describes}, from {path}",
        source=str(path))
    registry.models[name] = spec
    return spec


def config_record(spec: ModelSpec, path: str | Path, adapter: str | None,
                  frames: int | None, size: int | None) -> dict[str, Any]:
    """What run.json keeps of a model given by its config file: enough to rebuild it."""
    from leaps.adapter import sha256_file

    return {"path": spec.source, "given": str(path), "sha256": sha256_file(spec.source),
            "adapter": adapter, "frames": frames, "size": size}


def restore_model(record: dict[str, Any], where: str | Path,
                  on_warning: Callable[[str], None] | None = None) -> str:
    """Register again the model a run was made with, from its run.json ``record``, and
    return its registry name: a config-file model (whose file must be unchanged) or an entry
    of a registry file given with ``--registry``. Other runs' models are left as they are."""
    from leaps.adapter import sha256_file
    from leaps.registry import add_registry_files, load_registry

    saved = record.get("model_config")
    if isinstance(saved, dict):
        path = Path(str(saved.get("path")))
        if not path.is_file():
            raise LeapsError(f"{where}: the run's config file {path} is not found; put it back "
                             "to rebuild the model")
        if sha256_file(path) != saved.get("sha256"):
            raise LeapsError(f"{where}: config file {path} changed since the run (its sha256 "
                             "differs); restore the file the run was made with")
        spec = register_config_model(path, adapter=saved.get("adapter"),
                                     frames=saved.get("frames"), size=saved.get("size"),
                                     labels=record.get("labels"),
                                     on_warning=on_warning or (lambda _: None))
        return spec.name
    model = str(record.get("model"))
    source = record.get("registry_file")
    if source and model not in load_registry().models:
        if not Path(source).is_file():
            raise LeapsError(f"{where}: the run's model {model!r} came from registry file "
                             f"{source}, which is not found; put it back or pass --registry")
        add_registry_files([source])
    return model


def resolve_model_options(model: str | None, adapter: str | None,
                          model_config: str | Path | None, frames: int | None = None,
                          size: int | None = None, labels: str | Path | None = None,
                          on_warning: Callable[[str], None] = _warn
                          ) -> tuple[str | None, str | None, bool]:
    """The ``(model, adapter)`` a command builds from its ``--model``/``--adapter``/
    ``--config``/``--frames``/``--size`` options, and whether it is a config-file model: with
    ``--config`` the model is registered (:func:`register_config_model`) and named."""
    if model_config is None:
        if frames is not None or size is not None:
            raise LeapsError("--frames/--size set the input of a model given by --config; a "
                             "registry model has its own (drop them)")
        return model, adapter, False
    if model is not None:
        raise LeapsError("--config gives the model; drop --model (or --config)")
    spec = register_config_model(model_config, adapter=adapter, frames=frames, size=size,
                                 labels=labels, on_warning=on_warning)
    return spec.name, None, True
