"""The conformance suite every adapter, built-in or third-party, must pass.

Use it from your own test suite::

    from leaps.testing import AdapterConformance

    class TestMyAdapter(AdapterConformance):
        models = ["myplugin.tiny"]          # registry entries to check (at their reduced size)

Each ``check_*`` function is also usable on its own and raises ``AssertionError`` with a
message naming the model and what is wrong. :func:`registered_plugin` registers an in-process
plugin for the duration of a ``with`` block (for tests of plugins that are not installed);
:class:`InProcessPlugin` is such a plugin made of adapter classes and registry entries, and
:class:`Conv3DStack` a small 3D CNN adapter configured by its entry, which trains on
:mod:`leaps.datasets` motion clips in seconds::

    entry = motion_entry(["left", "right"], blocks=[[16, [1, 2, 2]], [32, [2, 2, 2]]])
    with registered_plugin(InProcessPlugin([Conv3DStack], {"mine.tiny": entry}), "mine"):
        model = build_model("mine.tiny")
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, Tap, VideoClassifier
from leaps.hookspecs import hookimpl
from leaps.plugins import get_host
from leaps.registry import ModelSpec, build_model, load_registry, reset_registry

BATCH = 2


def reduced_input(model: VideoClassifier, batch: int = BATCH, seed: int = 0) -> Tensor:
    """A reproducible random clip batch in [0, 1] at the model's input size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *model.spec.shape), generator=generator)


def capture_taps(model: VideoClassifier, video: Tensor) -> tuple[Tensor, list[Tensor], list[str]]:
    """Run ``model`` and return (logits, each tap's output as video, tap names in call order)."""
    outputs: dict[str, Tensor] = {}
    order: list[str] = []

    def hook(name: str, convert: Any) -> Any:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            if name not in outputs:
                order.append(name)
                outputs[name] = convert(output)
        return record

    handles = [tap.module.register_forward_hook(hook(tap.name, tap.to_video))
               for tap in model.taps]
    try:
        logits = model(video)
    finally:
        for handle in handles:
            handle.remove()
    missing = [tap.name for tap in model.taps if tap.name not in outputs]
    assert not missing, f"{model.model_name}: taps never ran in forward: {missing}"
    return logits, [outputs[tap.name] for tap in model.taps], order


# -- the checks ---------------------------------------------------------------------------
def check_input_spec(model: VideoClassifier) -> None:
    spec = model.spec
    name = model.model_name
    assert spec.frames >= 1 and spec.size >= 1, f"{name}: frames/size must be positive"
    assert len(spec.mean) == 3 and len(spec.std) == 3, f"{name}: mean/std need 3 values"
    assert min(spec.std) > 0, f"{name}: std must be positive"
    assert spec.value_range > 0, f"{name}: value_range must be positive"
    assert spec.layout == "BCTHW", f"{name}: the core feeds [B,C,T,H,W], got {spec.layout}"
    assert spec.labels, f"{name}: no class names"
    assert len(set(spec.labels)) == len(spec.labels), f"{name}: duplicate class names"
    assert not model.training, f"{name}: build() must return the model in eval mode"
    with torch.no_grad():
        logits = model(reduced_input(model))
    assert logits.shape == (BATCH, len(spec.labels)), (
        f"{name}: logits {tuple(logits.shape)} do not match batch {BATCH} x "
        f"{len(spec.labels)} classes")
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits"


def check_taps(model: VideoClassifier) -> None:
    name = model.model_name
    assert model.taps, f"{name}: no taps"
    names = [tap.name for tap in model.taps]
    assert len(set(names)) == len(names), f"{name}: duplicate tap names"
    with torch.no_grad():
        _, videos, order = capture_taps(model, reduced_input(model))
    assert order == names, (f"{name}: taps are not in forward order; forward runs "
                            f"{order}, the adapter lists {names}")
    for tap, video in zip(model.taps, videos):
        assert isinstance(video, Tensor) and video.dim() == 5, (
            f"{name}: tap {tap.name} converts to {getattr(video, 'shape', type(video))}, "
            "not [B, C, T, H, W]")
        assert video.shape[0] == BATCH, f"{name}: tap {tap.name} lost the batch dimension"
        assert min(video.shape) > 0, f"{name}: tap {tap.name} has an empty dimension"
        assert torch.isfinite(video).all(), f"{name}: tap {tap.name} is not finite"
    assert model.gradcam_layer in names or any(
        n == model.gradcam_layer for n, _ in model.net.named_modules()), (
        f"{name}: Grad-CAM layer {model.gradcam_layer!r} is neither a tap nor a module")


def check_tap_gradients(model: VideoClassifier) -> None:
    """A gradient reaches the input from every tap, and it is not zero."""
    video = reduced_input(model).requires_grad_(True)
    _, videos, _ = capture_taps(model, video)
    for tap, out in zip(model.taps, videos):
        assert out.requires_grad, f"{model.model_name}: tap {tap.name} is detached from the input"
        (grad,) = torch.autograd.grad(out.float().pow(2).mean(), video, retain_graph=True,
                                      allow_unused=True)
        assert grad is not None and grad.abs().sum() > 0, (
            f"{model.model_name}: no gradient reaches the input from tap {tap.name}")


def check_norm_layers(model: VideoClassifier) -> None:
    """Norm layers run in forward and their running stats fit their inputs' channels."""
    name = model.model_name
    assert model.norm_layers, f"{name}: no norm layers for the feature-diversity term"
    seen: dict[str, int] = {}

    def hook(layer: Any) -> Any:
        def record(_module: Any, inputs: tuple[Tensor, ...]) -> None:
            seen.setdefault(layer.name, inputs[0].shape[layer.channel_dim])
        return record

    handles = [layer.module.register_forward_pre_hook(hook(layer)) for layer in model.norm_layers]
    try:
        with torch.no_grad():
            model(reduced_input(model))
    finally:
        for handle in handles:
            handle.remove()
    for layer in model.norm_layers:
        assert layer.name in seen, f"{name}: norm layer {layer.name} never runs in forward"
        if layer.has_stats:
            assert layer.running_mean.shape == layer.running_var.shape == (seen[layer.name],), (
                f"{name}: norm layer {layer.name} has running stats of shape "
                f"{tuple(layer.running_mean.shape)} for {seen[layer.name]} input channels")


def check_registry_entry(spec: ModelSpec) -> None:
    registry = load_registry()
    assert registry.get(spec.name) == spec
    get_host().adapter(spec.adapter)
    if spec.verifier not in ("self", "none"):
        registry.get(spec.verifier)
    labels = spec.label_names()
    for pair in (*spec.mirrors, *spec.opposites):
        for cls in pair:
            assert cls in labels, f"{spec.name}: class {cls!r} of a mirror/opposite pair is " \
                                  "not in its label set"


def _built_with_stats(adapter: Any, reduced: ModelSpec, seed: int) -> Any:
    """The reduced model built under ``seed``, with non-trivial BatchNorm running statistics
    (so they are part of what a checkpoint must carry)."""
    torch.manual_seed(seed)
    model = adapter.build(reduced)
    with torch.no_grad():
        for layer in model.norm_layers:
            if layer.has_stats:
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return model


def check_checkpoint_round_trip(spec: ModelSpec, directory: Path) -> None:
    """A checkpoint written in the family's native format loads back to identical logits."""
    adapter = get_host().adapter(spec.adapter)()
    reduced = spec.at_reduced_size()
    first = _built_with_stats(adapter, reduced, seed=1)
    path = directory / f"{spec.name}.ckpt"
    adapter.save_checkpoint(first.net, path)
    torch.manual_seed(2)
    second = adapter.build(reduced, checkpoint=path)
    video = reduced_input(first)
    with torch.no_grad():
        a, b = first(video), second(video)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (
        f"{spec.name}: logits differ after a checkpoint round trip "
        f"(max abs diff {(a - b).abs().max().item():.3g})")


def _corner_cells(model: VideoClassifier, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """The input region that maps onto cell (last frame, top row, right column) of a tap grid
    ``(T', H', W')``: one cell's share of the clip, at an asymmetric corner (a swap of H and W
    or of time and space moves it elsewhere)."""
    spec = model.spec
    t, h, w = shape
    ct, ch, cw = (-(-spec.frames // t), -(-spec.size // h), -(-spec.size // w))
    return (slice(spec.frames - ct, spec.frames), slice(0, ch), slice(spec.size - cw, spec.size))


def early_taps(model: VideoClassifier, grids: Sequence[tuple[int, ...]]) -> list[int]:
    """Indices of the taps the locality check reads: those of the first quarter (at least the
    first tap) still on the first tap's grid - before pooling or strides mix cells."""
    return [i for i in range(max(1, len(model.taps) // 4)) if grids[i] == grids[0]]


def check_tap_locality(model: VideoClassifier) -> None:
    """A change in one corner of the clip (the last frames, top rows, right columns) moves
    that corner's cell of each early tap more than any other cell.

    Catches taps laid onto their grid wrongly: tokens read in the wrong order (time-major
    vs space-major), H and W swapped, time reversed. Checked on early taps, where a cell still
    sees mostly its own part of the clip."""
    name = model.model_name
    video = reduced_input(model, batch=1)
    with torch.no_grad():
        _, before, _ = capture_taps(model, video)
    for index in early_taps(model, [tuple(v.shape[2:]) for v in before]):
        tap, out = model.taps[index], before[index]
        grid = tuple(out.shape[2:])
        region = _corner_cells(model, grid)
        changed = video.clone()
        changed[:, :, region[0], region[1], region[2]] = 1 - changed[:, :, region[0], region[1],
                                                                     region[2]]
        with torch.no_grad():
            _, after, _ = capture_taps(model, changed)
        moved = (after[index] - out).float().abs().sum(dim=(0, 1))  # [T', H', W']
        assert moved.max() > 0, (f"{name}: tap {tap.name} does not change when the clip "
                                 "changes; is it tapping the right module?")
        expected = (grid[0] - 1, 0, grid[2] - 1)
        # Where the change sits: its centre of mass (weighted by the squared change, so the
        # peak counts most). A receptive field can put the peak one cell off the corner; a
        # misread grid puts the change in the wrong half of an axis. An axis of two cells says
        # nothing (a 3-wide kernel lets both cells see the whole axis): only axes of three or
        # more cells are judged.
        weight = moved.pow(2) / moved.pow(2).sum()
        centre = [float((weight.sum(dim=tuple(d for d in range(3) if d != axis))
                         * torch.arange(size, dtype=weight.dtype)).sum())
                  for axis, size in enumerate(grid)]
        wrong = [axis for axis, size in zip("thw", grid)
                 if size > 2 and abs(centre["thw".index(axis)] - expected["thw".index(axis)])
                 > (size - 1) / 2]
        assert not wrong, (
            f"{name}: tap {tap.name} is laid onto its [T, H, W] grid {list(grid)} wrongly: "
            "changing the clip's last frames, top rows and right columns moved the cells "
            f"around (t, h, w) = ({', '.join(f'{c:.1f}' for c in centre)}), not those near "
            f"{expected} (wrong along {', '.join(wrong)}). Token order (time-major 'thw' vs "
            "space-major 'hwt': tokens_to_video(order=...)), an H/W swap or reversed time in "
            "its to_video conversion do this")


_CONTAINERS = (nn.Sequential, nn.ModuleList)


def check_taps_cover_blocks(model: VideoClassifier) -> None:
    """Where a tap is one of a run of repeated blocks (children of one Sequential/ModuleList
    of one class), every block of that run is tapped: LEAPS primes every layer, not a
    selection (the last block alone is the official code's defect)."""
    name = model.model_name
    tapped = {id(tap.module) for tap in model.taps}
    names = {id(module): n for n, module in model.net.named_modules()}
    contains_tap: dict[int, bool] = {}

    def has_tap(module: nn.Module) -> bool:
        key = id(module)
        if key not in contains_tap:
            contains_tap[key] = key in tapped or any(has_tap(c) for c in module.children())
        return contains_tap[key]

    for container_name, container in model.net.named_modules():
        if not isinstance(container, _CONTAINERS) or id(container) in tapped:
            continue
        children = list(container.children())
        for cls in {type(c) for c in children if has_tap(c)}:
            run = [c for c in children if type(c) is cls]
            missing = [names.get(id(c), "?") for c in run if not has_tap(c)]
            assert not missing, (
                f"{name}: taps cover only {len(run) - len(missing)} of the {len(run)} "
                f"{cls.__name__} blocks of {container_name or 'the network'}; untapped: "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. List every "
                "block as a tap (LEAPS primes all layers), not the last one or a selection")


def check_native_checkpoint(spec: ModelSpec, directory: Path) -> bool:
    """A checkpoint written by the model library's *own* saver (``Adapter.save_native``) loads
    through ``--checkpoint`` to identical logits. Returns False when the adapter has no such
    saver (nothing to check)."""
    adapter = get_host().adapter(spec.adapter)()
    reduced = spec.at_reduced_size()
    first = _built_with_stats(adapter, reduced, seed=3)
    saved = adapter.save_native(first.net, directory)
    if saved is None:
        return False
    torch.manual_seed(4)
    try:
        second = adapter.build(reduced, checkpoint=saved)
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        raise AssertionError(
            f"{spec.name}: a checkpoint saved by the library's own saver ({Path(saved).name}) "
            f"does not load through --checkpoint: {exc}") from None
    video = reduced_input(first)
    with torch.no_grad():
        a, b = first(video), second(video)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (
        f"{spec.name}: a checkpoint saved by the library's own saver ({Path(saved).name}) "
        f"loads, but its logits differ (max abs diff {(a - b).abs().max().item():.3g}): "
        "weights were left at their initial values or mapped onto the wrong modules")
    return True


HEAVY_LIBRARIES = ("transformers", "timm", "mmaction", "mmengine", "mmcv", "pytorchvideo",
                   "torchvision.models", "captum")
_IMPORT_CHECKED: dict[str, list[str]] = {}


def check_lazy_imports(adapter: str) -> None:
    """Importing the module that defines ``adapter`` (what every leaps start does) imports no
    model library: those are imported inside ``create`` and the other methods, so
    ``leaps --help`` stays fast and works while the library is missing."""
    import subprocess
    import sys

    cls = get_host().adapter(adapter)
    module = cls.__module__
    heavy = sorted({*HEAVY_LIBRARIES, *cls.requires})
    if module not in _IMPORT_CHECKED:
        code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
                "print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))")
        proc = subprocess.run([sys.executable, "-c", code, module, *heavy],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"{adapter}: importing {module} fails: "
                                      f"{proc.stderr.strip().splitlines()[-1:]}")
        import json

        _IMPORT_CHECKED[module] = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = _IMPORT_CHECKED[module]
    assert not loaded, (f"{adapter}: importing {module} imports {', '.join(loaded)} at top "
                        "level; import model libraries inside create() (and the other "
                        "methods), so that every leaps start stays fast and works without them")


# -- pytest integration --------------------------------------------------------------------
class AdapterConformance:
    """Subclass in a test module and set ``models``; pytest runs every check per model."""

    models: ClassVar[list[str]] = []

    def pytest_generate_tests(self, metafunc: Any) -> None:
        if "model_name" in metafunc.fixturenames:
            metafunc.parametrize("model_name", list(self.models))

    def test_input_spec(self, model_name: str) -> None:
        check_input_spec(_reduced(model_name))

    def test_taps(self, model_name: str) -> None:
        check_taps(_reduced(model_name))

    def test_tap_gradients(self, model_name: str) -> None:
        check_tap_gradients(_reduced(model_name))

    def test_norm_layers(self, model_name: str) -> None:
        check_norm_layers(_reduced(model_name))

    def test_registry_entry(self, model_name: str) -> None:
        check_registry_entry(load_registry().get(model_name))

    def test_checkpoint_round_trip(self, model_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            check_checkpoint_round_trip(load_registry().get(model_name), Path(tmp))

    def test_tap_locality(self, model_name: str) -> None:
        check_tap_locality(_reduced(model_name))

    def test_taps_cover_blocks(self, model_name: str) -> None:
        check_taps_cover_blocks(_reduced(model_name))

    def test_native_checkpoint(self, model_name: str) -> None:
        import pytest

        with tempfile.TemporaryDirectory() as tmp:
            if not check_native_checkpoint(load_registry().get(model_name), Path(tmp)):
                pytest.skip("the adapter has no library saver (save_native) of its own")

    def test_lazy_imports(self, model_name: str) -> None:
        check_lazy_imports(load_registry().get(model_name).adapter)


_CACHE: dict[str, VideoClassifier] = {}


def _reduced(name: str) -> VideoClassifier:
    # One build per model and process: the checks only read the model.
    if name not in _CACHE:
        _CACHE.clear()
        torch.manual_seed(0)
        _CACHE[name] = build_model(name, reduced=True)
    return _CACHE[name]


@contextlib.contextmanager
def registered_plugin(plugin: Any, name: str) -> Iterator[None]:
    """Register ``plugin`` (its adapters and registry entries) for the ``with`` block only."""
    host = get_host()
    info = host.add(plugin, name)
    reset_registry()
    _CACHE.clear()
    try:
        yield
    finally:
        if info is not None:
            host.remove(plugin, info)
        reset_registry()
        _CACHE.clear()


class InProcessPlugin:
    """A plugin made of adapter classes and registry entries, for :func:`registered_plugin`.
    The entries are given by name, or as the ``{"models": {...}}`` mapping that the models
    hook's ``register`` takes."""

    def __init__(self, adapters: Sequence[type[Adapter]], models: dict[str, Any]) -> None:
        # ``models``: the entries by name, or the mapping a registry file holds (what the
        # models hook's register() takes: ``{"models": {...}}``) - either shape works
        if set(models) == {"models"} and isinstance(models["models"], dict):
            models = models["models"]
        self.adapters, self.models = list(adapters), models

    @hookimpl
    def leaps_register_adapters(self, register: Callable[[type], None]) -> None:
        for adapter in self.adapters:
            register(adapter)

    @hookimpl
    def leaps_register_models(self, register: Callable[[Any], None]) -> None:
        register({"models": self.models})


def _conv_bn_relu(cin: int, cout: int, stride: Sequence[int], kernel: Sequence[int]) -> nn.Module:
    return nn.Sequential(nn.Conv3d(cin, cout, tuple(kernel), stride=tuple(stride),
                                   padding=tuple(k // 2 for k in kernel), bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU())


class Conv3DStack(Adapter):
    """Blocks of Conv3d-BatchNorm-ReLU, a global average pool and a linear head; one tap per
    block (``block0``, ``block1``, ...). ``arch["blocks"]`` lists the blocks, each one conv
    ``[out_channels, stride]`` or ``[out_channels, stride, kernel]`` (default kernel 3x3x3), or
    a list of such convs run in sequence (e.g. a spatial then a temporal one, as in (2+1)D)."""

    name = "testing.conv3d"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        layers, channels = [], 3
        for block in arch["blocks"]:
            convs = block if isinstance(block[0], list) else [block]
            modules = []
            for out, stride, *kernel in convs:
                kernel = kernel[0] if kernel else (3, 3, 3)
                modules.append(_conv_bn_relu(channels, out, stride, kernel))
                channels = out
            layers.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                             nn.Linear(channels, num_classes))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(f"block{i}", net[i]) for i in range(len(arch["blocks"]))]


def motion_entry(classes: Sequence[str], blocks: list[Any], **fields: Any) -> dict[str, Any]:
    """A registry entry for a :class:`Conv3DStack` on 8x32x32 motion clips of ``classes``
    (verifier ``self``; ``fields`` add or replace entry fields, e.g. mirrors, opposites)."""
    return {"adapter": Conv3DStack.name, "arch": {"blocks": blocks},
            "input": {"frames": 8, "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
            "labels": list(classes), "verifier": "self",
            "leaps": {"lambda_1": 1.0, "lambda_L": 0.2, "r": 1e-3}, **fields}
