"""Built-in plugin ``mmaction``: mmaction2 recognizers, built from mmaction2 config files.

Families (adapter names): ``mmaction.swin`` (Video Swin), ``mmaction.mvit`` (MViTv2),
``mmaction.uniformerv2``, ``mmaction.timesformer``, ``mmaction.x3d``, ``mmaction.csn`` (ir/ip-CSN),
``mmaction.r2plus1d``, ``mmaction.slowonly``, ``mmaction.i3d`` and ``mmaction.tsm``.

Every family builds a recognizer the way mmaction2 does (mmengine ``Config`` + mmaction's
``MODELS`` registry) from the entry's ``arch``:

* ``config``: an mmaction2 config, either a path inside the configs shipped in the mmaction2
  wheel (``recognition/swin/swin-tiny-p244-w877_in1k-pre_8xb8-amp-32x2x1-30e_kinetics400-rgb.py``)
  or your own config file (absolute, relative to the registry file that names it, or relative to
  the working directory; it may ``_base_`` on a wheel config by its absolute path, found under
  :func:`configs_dir`);
* ``cfg_options``: overrides in mmaction's ``--cfg-options`` style, e.g.
  ``{"model.backbone.depth": 18}`` (a dict value replacing a non-dict needs ``_delete_: true``).

The classifier is sized to the label set, every pretrained-weight field is cleared (nothing
downloads while building), and fields that fix the input size (positional embeddings, segment
counts) follow the entry's frames and crop size. The config's ``data_preprocessor`` is not run:
its mean/std (0-255 pixels) must equal the entry's input mean/std with ``value_range: 255``,
which the core applies instead. Native checkpoints are mmengine's ``{"meta", "state_dict"}``
files with the recognizer's keys (``backbone.*``, ``cls_head.*``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import logging
import math
import re
import sys
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from leaps.adapter import (
    Adapter,
    ConfigModel,
    InputSpec,
    Tap,
    VideoClassifier,
    channels_last_to_video,
    tokens_to_video,
)
from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl

if TYPE_CHECKING:
    from mmengine.config import Config

    from leaps.registry import ModelSpec

# The mmaction2 1.2.0 wheel omits this package (open-mmlab/mmaction2#2714) although
# mmaction/models/localizers/__init__.py imports it, so `import mmaction.models` fails without it.
_DRN_PACKAGE = "mmaction.models.localizers.drn"
_DRN_MISSING = ("the mmaction2 wheel lacks mmaction/models/localizers/drn "
                "(open-mmlab/mmaction2#2714), so the DRN localizer cannot be built; install "
                "mmaction2 from its git repository to use DRN")


# -- importing mmaction2 ------------------------------------------------------------------
def mmaction_dir() -> Path:
    """The installed ``mmaction`` package directory (found without importing it)."""
    found = importlib.util.find_spec("mmaction")
    if found is None or not found.submodule_search_locations:
        raise LeapsError("mmaction2 is not installed; pip install 'leaps[mmaction]'")
    return Path(next(iter(found.submodule_search_locations)))


def configs_dir() -> Path:
    """The config tree shipped inside the mmaction2 wheel (``mmaction/.mim/configs``)."""
    return mmaction_dir() / ".mim" / "configs"


class _MissingDRN:
    """Stands in for mmaction's DRN localizer where the wheel lacks it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise LeapsError(_DRN_MISSING)


def import_mmaction_models() -> None:
    """Import ``mmaction.models`` (which registers every recognizer), working around the wheel's
    missing DRN package with a stand-in whose ``DRN`` raises a clear error when built."""
    if "mmaction.models" in sys.modules:
        return
    stand_in = not (mmaction_dir() / "models" / "localizers" / "drn").is_dir()
    if stand_in:
        package = types.ModuleType(_DRN_PACKAGE)
        package.__path__ = []
        module = types.ModuleType(f"{_DRN_PACKAGE}.drn")
        package.DRN = module.DRN = _MissingDRN  # type: ignore[attr-defined]
        package.drn = module  # type: ignore[attr-defined]
        sys.modules.setdefault(_DRN_PACKAGE, package)
        sys.modules.setdefault(f"{_DRN_PACKAGE}.drn", module)
    _skip_multimodal_on_transformers_5()
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; mmaction warns about one that no recognizer uses.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention")
        import mmaction.models  # noqa: F401
    from mmaction.registry import MODELS

    if stand_in and "DRN" not in MODELS.module_dict:
        # A config naming the DRN localizer then fails with the reason, not "not registered".
        MODELS.register_module(name="DRN", module=_MissingDRN)


def _skip_multimodal_on_transformers_5() -> None:
    """mmaction2 1.2.0 imports its VindLU retrieval models whenever transformers >= 4.28 is
    installed, and they import names transformers 5 removed (apply_chunking_to_forward), which
    breaks ``import mmaction.models``. With transformers 5 (leaps[transformers]) mmaction's own
    placeholders stand in for those multimodal models; no recognizer uses them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return
    if major >= 5:
        import mmaction.utils.dependency as dependency

        dependency.WITH_MULTIMODAL = False


# -- configs --------------------------------------------------------------------------------
def wheel_configs() -> list[str]:
    """Recognition configs shipped in the wheel, as paths relative to :func:`configs_dir`."""
    root = configs_dir()
    return sorted(str(p.relative_to(root)) for p in (root / "recognition").rglob("*.py")
                  if "__pycache__" not in p.parts)


def resolve_config_path(config: Any, base: Path | None = None) -> Path:
    """Find ``arch.config``: an absolute path, a path relative to ``base`` (the registry file's
    folder) or to the working directory, or a path inside the wheel's configs."""
    if not isinstance(config, str) or not config:
        raise LeapsError(f"arch.config must name an mmaction2 config, got {config!r}; give a "
                         "path under mmaction's configs (e.g. recognition/x3d/"
                         "x3d_m_16x5x1_facebook-kinetics400-rgb.py) or your own config file")
    path = Path(config).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [*([base / path] if base is not None else []), Path.cwd() / path,
                      configs_dir() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    close = difflib.get_close_matches(config, wheel_configs(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise LeapsError(f"mmaction2 config {config!r} not found (looked in: "
                     f"{', '.join(str(c.parent) for c in candidates)}); {hint}give a path "
                     f"relative to {configs_dir()} or an existing config file")


def _clear_pretrained(node: Any) -> None:
    """Clear every field that makes a model load weights when it is initialised, so that
    building never downloads (weights come from the checkpoint the user passes)."""
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if key == "pretrained" and isinstance(value, str):
                node[key] = None
            elif key in ("pretrained2d", "clip_pretrained") and value:
                node[key] = False
            elif key == "init_cfg" and _loads_weights(value):
                del node[key]
            else:
                _clear_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _clear_pretrained(item)


def _loads_weights(init_cfg: Any) -> bool:
    items = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(i, dict) and str(i.get("type")) == "Pretrained" for i in items)


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Keep mmengine's log lines below ``level`` and torch deprecation warnings of model
    construction off the user's terminal (they say nothing about the user's model)."""
    from mmengine.logging import MMLogger

    loggers = {MMLogger.get_current_instance(), MMLogger.get_instance("mmengine")}
    levels = {logger: logger.level for logger in loggers}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid")
        for logger in loggers:
            logger.setLevel(level)
        try:
            yield
        finally:
            for logger, previous in levels.items():
                logger.setLevel(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# -- checkpoints ----------------------------------------------------------------------------
class _Bookkeeping:
    """Inert stand-in for the training bookkeeping mmengine's runner pickles beside the weights
    (message-hub history buffers, numpy arrays and scalars). The weights never need it, so none
    of it is rebuilt and loading stays ``weights_only``: no code from the file runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_BOOKKEEPING_GLOBALS = [
    (_Bookkeeping, name) for name in (
        "mmengine.logging.history_buffer.HistoryBuffer",
        "builtins.getattr",  # pickles HistoryBuffer's statistics methods
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
        "numpy.ndarray", "numpy.dtype",
    )
]


# -- the adapters -----------------------------------------------------------------------------
class MmactionAdapter(Adapter):
    """What every mmaction2 family shares: building a recognizer from a config, feeding it, and
    its checkpoints. A family sets ``name``, ``backbones`` and ``size_options`` and lists taps.

    Class attributes:
      backbones: the backbone classes (by name) whose taps the family knows.
      size_options: config fields that must follow the entry's ``frames`` / ``size``.
    """

    requires: ClassVar[dict[str, str]] = {"mmaction": "leaps[mmaction]",
                                             "mmengine": "leaps[mmaction]"}
    checkpoint_format: ClassVar[str] = (
        "an mmengine checkpoint ({'meta': ..., 'state_dict': recognizer weights}) as mmaction2 "
        "publishes and trains them, or a plain state dict with the recognizer's keys")
    # Official and trained checkpoints carry mmengine's training bookkeeping beside the
    # weights; it unpickles as inert placeholders, so loading stays weights_only.
    checkpoint_safe_globals: ClassVar[list[Any]] = _BOOKKEEPING_GLOBALS
    backbones: ClassVar[tuple[str, ...]] = ()
    size_options: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- building -----------------------------------------------------------------------
    def build(self, spec: ModelSpec, checkpoint: str | Path | None = None,
              labels: tuple[str, ...] | None = None) -> VideoClassifier:
        """Resolve ``arch.config`` (relative paths first against the registry file that names
        the entry), then build as every adapter does."""
        source = Path(spec.source) if spec.source else None
        base = source.parent if source is not None and source.is_file() else None
        arch = {**spec.arch, "config": str(resolve_config_path(spec.arch.get("config"), base))}
        return super().build(replace(spec, arch=arch), checkpoint, labels)

    def recognizer_config(self, arch: dict[str, Any], num_classes: int,
                          spec: InputSpec) -> Config:
        """The mmengine Config the recognizer is built from: the config file with
        ``cfg_options``, the input size and ``num_classes`` merged in, pretrained fields cleared."""
        from mmengine.config import Config

        unknown = sorted(set(arch) - {"config", "cfg_options", "any_backbone"})
        if unknown:
            raise LeapsError(f"{self.name}: unknown arch field(s) {', '.join(unknown)}; mmaction "
                             "entries take arch.config, arch.cfg_options (and arch.any_backbone)")
        path = resolve_config_path(arch.get("config"))
        options = copy.deepcopy(arch.get("cfg_options") or {})
        if not isinstance(options, dict):
            raise LeapsError(f"arch.cfg_options must be a mapping like "
                             f"{{'model.backbone.depth': 18}}, got {options!r}")
        for key, value in self._size_options(spec).items():
            if key in options and options[key] != value:
                raise LeapsError(f"arch.cfg_options sets {key}={options[key]!r}, but the entry's "
                                 f"input makes it {value!r}; drop the option or change "
                                 "input.frames/input.size")
            options[key] = value
        options["model.cls_head.num_classes"] = num_classes
        try:
            cfg = Config.fromfile(str(path))
            cfg.merge_from_dict(options)
        except Exception as exc:  # noqa: BLE001 - any parse or merge problem of a user's config
            raise LeapsError(f"cannot read mmaction2 config {path} with cfg_options {options} "
                             f"({_first_line(exc)}); fix the config or arch.cfg_options"
                             ) from None
        _clear_pretrained(cfg.model)
        self._check_normalisation(cfg, spec, path)
        return cfg

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        cfg = self.recognizer_config(arch, num_classes, spec)
        import_mmaction_models()
        from mmaction.registry import MODELS
        from mmengine.registry import init_default_scope

        init_default_scope(cfg.get("default_scope", "mmaction"))
        try:
            with _quiet():
                net = MODELS.build(cfg.model)
        except LeapsError:
            raise
        except Exception as exc:  # noqa: BLE001 - mmaction reports a bad config as whatever its code raises
            raise LeapsError(f"mmaction2 cannot build the recognizer of {arch['config']} "
                             f"({_first_line(exc)}); fix the config or arch.cfg_options"
                             ) from None
        net.cfg = cfg  # as mmaction's init_recognizer does; save_checkpoint records it
        if not arch.get("any_backbone"):
            self._check_backbone(net, arch["config"])
        return net

    def _size_options(self, spec: InputSpec) -> dict[str, int]:
        values = {"frames": spec.frames, "size": spec.size}
        return {key: values[what] for what, keys in self.size_options.items() for key in keys}

    def _check_normalisation(self, cfg: Config, spec: InputSpec, path: Path) -> None:
        preprocessor = cfg.model.get("data_preprocessor") or {}
        mean = preprocessor.get("mean") or (0.0, 0.0, 0.0)
        std = preprocessor.get("std") or (1.0, 1.0, 1.0)
        ours = [v / spec.value_range for v in (*spec.mean, *spec.std)]
        theirs = [v / 255.0 for v in (*mean, *std)]
        same = len(ours) == len(theirs) and all(
            math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(ours, theirs))
        if not same:
            raise LeapsError(f"the entry's input mean {list(spec.mean)} / std {list(spec.std)} "
                             f"(value_range {spec.value_range:g}) differ from the data_preprocessor"
                             f" of {path.name} (mean {list(mean)}, std {list(std)} on 0-255 "
                             "pixels); set input.mean/std to the config's with value_range: 255")

    def _check_backbone(self, net: nn.Module, config: str) -> None:
        backbone = type(getattr(net, "backbone", None))
        kind = backbone.__name__
        # A backbone subclassing a tapped one (a user's variant) has the same layers.
        if any(base.__name__ in self.backbones for base in backbone.__mro__):
            return
        owner = next((a.name for a in ADAPTERS if kind in a.backbones), None)
        hint = f"use adapter {owner}" if owner else "no mmaction adapter taps it yet"
        raise LeapsError(f"{config} builds a {kind} backbone, but {self.name} taps "
                         f"{'/'.join(self.backbones)}; {hint}")

    # -- a user's config file (leaps invert --config) --------------------------------------
    @classmethod
    def read_config(cls, path: Path, frames: int | None = None, size: int | None = None,
                    forced: bool = False) -> ConfigModel | None:
        """An mmaction2 recognizer config (a ``.py`` file with ``model = dict(type=...Recognizer
        ..., backbone=...)``, as ``tools/train.py`` writes it into its work dir): taken by the
        adapter that taps its backbone type. Frames come from the test pipeline's sampling step
        (``clip_len``; ``num_clips`` of 2D recognizers' one-frame segments) or the fields that
        fix the model's input (``num_frames``, ``num_segments`` ...), the size from its crop
        (``CenterCrop``/``ThreeCrop``/``TenCrop``) or else its ``Resize`` scale, mean/std from
        ``model.data_preprocessor`` on 0-255 pixels, the class count from ``cls_head``."""
        cfg = _read_user_config(path)
        if cfg is None:
            return None
        backbone = _type_name(cfg.model.get("backbone", {}).get("type"))
        owner = adapter_for_backbone(backbone)
        if not forced:
            if owner is None:
                tapped = ", ".join(f"{'/'.join(a.backbones)} ({a.name})" for a in ADAPTERS)
                raise LeapsError(f"{path} builds a {backbone} backbone, which no adapter taps "
                                 f"(the mmaction adapters tap: {tapped}); pass --adapter NAME to "
                                 "force one whose layers it shares")
            if owner is not cls:
                return None
        fixed = {what: [(key, _lookup(cfg, key)) for key in keys
                        if _lookup(cfg, key) is not None]
                 for what, keys in cls.size_options.items()}
        sampled, cropped = _pipeline_input(cfg)
        frames = _input_value(path, "frames", frames, sampled, fixed.get("frames", []))
        size = _input_value(path, "size", size, cropped, fixed.get("size", []))
        preprocessor = cfg.model.get("data_preprocessor") or {}
        mean = _triple(path, "mean", preprocessor.get("mean"), 0.0)
        std = _triple(path, "std", preprocessor.get("std"), 1.0)
        if min(std) <= 0:
            raise LeapsError(f"{path}: model.data_preprocessor.std {list(std)} must be positive;"
                             " fix the config")
        head = cfg.model.get("cls_head") or {}
        num_classes = head.get("num_classes")
        arch: dict[str, Any] = {"config": str(path)}
        if owner is not cls:
            arch["any_backbone"] = True
        return ConfigModel(arch=arch, frames=frames, size=size, mean=mean, std=std,
                           value_range=255.0,
                           num_classes=int(num_classes) if num_classes is not None else None,
                           describes=f"an mmaction2 {_type_name(cfg.model.get('type'))} with a "
                                     f"{backbone} backbone")

    # -- running --------------------------------------------------------------------------
    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        """Logits of the recognizer's backbone and head (mmaction's ``mode='tensor'`` up to the
        head): 3D recognizers take one clip per sample ``[B, 1, C, T, H, W]``, 2D ones (TSM) the
        frames as segments ``[B, T, C, H, W]``."""
        from mmaction.models.recognizers import Recognizer2D

        if isinstance(net, Recognizer2D):
            inputs = x.transpose(1, 2).contiguous()
        else:
            inputs = x.unsqueeze(1)
        return net(inputs, mode="tensor", stage="head")

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict_from_checkpoint(self, obj: Any) -> dict[str, Tensor]:
        """``obj["state_dict"]`` of an mmengine checkpoint (or a bare state dict), with the
        ``module.`` prefix of distributed training removed as mmengine's loader does."""
        state = super().state_dict_from_checkpoint(obj)
        if not isinstance(state, dict):
            return state
        return {re.sub(r"^module\.", "", key): value for key, value in state.items()}

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        """Write an mmengine checkpoint, as mmaction2's runner does: weights plus meta (the
        versions, a time stamp, and the config the recognizer was built from)."""
        import mmaction
        import mmengine
        from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

        meta: dict[str, Any] = {"mmengine_version": mmengine.__version__,
                                "mmaction_version": mmaction.__version__,
                                "time": time.strftime("%Y%m%d_%H%M%S"), "saved_by": "leaps"}
        cfg = getattr(net, "cfg", None)
        if cfg is not None:
            meta["cfg"] = cfg.pretty_text
        with _quiet(logging.ERROR):  # mmengine warns that its own file client is deprecated
            save_checkpoint({"meta": meta, "state_dict": weights_to_cpu(get_state_dict(net))},
                            str(path))


def _blocks(backbone: nn.Module) -> list[Tap]:
    """Every residual block of a ResNet-style backbone, stage by stage (``res_layers``)."""
    return [Tap(f"backbone.{layer}.{i}", block)
            for layer in backbone.res_layers for i, block in enumerate(getattr(backbone, layer))]


class SwinAdapter(MmactionAdapter):
    """Video Swin: every transformer block; its channels-last output is permuted."""

    name = "mmaction.swin"
    backbones = ("SwinTransformer3D",)

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(f"backbone.layers.{i}.blocks.{j}", block, channels_last_to_video)
                for i, layer in enumerate(net.backbone.layers)
                for j, block in enumerate(layer.blocks)]


class MViTAdapter(MmactionAdapter):
    """MViTv2: every multiscale block; tokens go back onto their T x H x W grid (class token
    dropped). Its relative position embeddings are sized for the entry's input."""

    name = "mmaction.mvit"
    backbones = ("MViT",)
    size_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "frames": ("model.backbone.temporal_size",), "size": ("model.backbone.spatial_size",)}

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        prefix = 1 if net.backbone.with_cls_token else 0

        def to_video(output: tuple[Tensor, Any]) -> Tensor:
            tokens, thw = output
            return tokens_to_video(tokens, tuple(thw), prefix=prefix)

        return [Tap(f"backbone.blocks.{i}", block, to_video)
                for i, block in enumerate(net.backbone.blocks)]


class UniFormerV2Adapter(MmactionAdapter):
    """UniFormerV2: every local UniBlock of the (CLIP) backbone. Their ``[1 + H*W, N*T, C]``
    tokens become ``[N, C, T, H, W]`` (class token dropped); the global blocks only update the
    video class token, so they are not taps."""

    name = "mmaction.uniformerv2"
    backbones = ("UniFormerV2",)
    size_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "frames": ("model.backbone.t_size",), "size": ("model.backbone.input_resolution",)}

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        frames = net.backbone.transformer.T

        def to_video(tokens: Tensor) -> Tensor:
            patches = tokens[1:]
            side = math.isqrt(patches.shape[0])
            batch = patches.shape[1] // frames
            return patches.reshape(side, side, batch, frames, -1).permute(2, 4, 3, 0, 1)

        return [Tap(f"backbone.transformer.resblocks.{i}", block, to_video)
                for i, block in enumerate(net.backbone.transformer.resblocks)]


class TimeSformerAdapter(MmactionAdapter):
    """TimeSformer: every transformer layer. Divided and joint space-time layers carry
    ``[B, 1 + P*T, C]`` tokens (patch-major), space-only ones ``[B*T, 1 + P, C]``."""

    name = "mmaction.timesformer"
    backbones = ("TimeSformer",)
    size_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "frames": ("model.backbone.num_frames",), "size": ("model.backbone.img_size",)}

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        backbone = net.backbone
        frames = backbone.num_frames
        height, width = (i // p for i, p in zip(backbone.patch_embed.img_size,
                                                 backbone.patch_embed.patch_size, strict=True))
        space_only = backbone.attention_type == "space_only"

        def to_video(tokens: Tensor) -> Tensor:
            patches = tokens[:, 1:]
            if space_only:
                video = patches.reshape(-1, frames, height, width, patches.shape[-1])
                return video.permute(0, 4, 1, 2, 3)
            video = patches.reshape(patches.shape[0], height, width, frames, patches.shape[-1])
            return video.permute(0, 4, 3, 1, 2)

        return [Tap(f"backbone.transformer_layers.layers.{i}", layer, to_video)
                for i, layer in enumerate(backbone.transformer_layers.layers)]


class X3DAdapter(MmactionAdapter):
    """X3D: the stem, every residual block, and the final 1x1x1 convolution."""

    name = "mmaction.x3d"
    backbones = ("X3D",)

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        backbone = net.backbone
        return [Tap("backbone.conv1_t", backbone.conv1_t), *_blocks(backbone),
                Tap("backbone.conv5", backbone.conv5)]


class ResNet3dAdapter(MmactionAdapter):
    """3D ResNets (I3D, SlowOnly, CSN, R(2+1)D): the stem and every residual block."""

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap("backbone.conv1", net.backbone.conv1), *_blocks(net.backbone)]


class I3DAdapter(ResNet3dAdapter):
    name = "mmaction.i3d"
    backbones = ("ResNet3d",)


class SlowOnlyAdapter(ResNet3dAdapter):
    name = "mmaction.slowonly"
    backbones = ("ResNet3dSlowOnly",)


class CSNAdapter(ResNet3dAdapter):
    name = "mmaction.csn"
    backbones = ("ResNet3dCSN",)


class R2Plus1DAdapter(ResNet3dAdapter):
    name = "mmaction.r2plus1d"
    backbones = ("ResNet2Plus1d",)


class TSMAdapter(MmactionAdapter):
    """TSM: a 2D ResNet run on the frames as a batch of segments; the stem and every residual
    block, their ``[B*T, C, H, W]`` outputs regrouped as ``[B, C, T, H, W]``. Its segment count
    follows the entry's frames."""

    name = "mmaction.tsm"
    backbones = ("ResNetTSM",)
    size_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "frames": ("model.backbone.num_segments", "model.cls_head.num_segments")}

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        frames = net.backbone.num_segments

        def to_video(output: Tensor) -> Tensor:
            video = output.reshape(-1, frames, *output.shape[1:])
            return video.transpose(1, 2)

        return [Tap("backbone.conv1", net.backbone.conv1, to_video),
                *(replace(tap, to_video=to_video) for tap in _blocks(net.backbone))]


# -- reading a user's config file -----------------------------------------------------------
_SAMPLERS = ("SampleFrames", "UniformSample", "UniformSampleFrames", "DenseSampleFrames")
_CROPS = ("CenterCrop", "ThreeCrop", "TenCrop")


def _read_user_config(path: Path) -> Config | None:
    """``path`` parsed as an mmengine config, if it is one of an mmaction2 recognizer (a
    ``model`` with a ``backbone``); None for anything else, or without mmaction2."""
    if path.suffix != ".py" or importlib.util.find_spec("mmengine") is None \
            or importlib.util.find_spec("mmaction") is None:
        return None
    return _parse_config(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parse_config(path: str, mtime: int) -> Config | None:
    from mmengine.config import Config

    try:
        with _quiet(logging.ERROR):
            cfg = Config.fromfile(path)
    except Exception as exc:  # noqa: BLE001 - whatever a user's broken config raises
        raise LeapsError(f"cannot read the config {path} ({_first_line(exc)}); fix it so that "
                         "mmaction2's tools/test.py could run it") from None
    model = cfg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict):
        return None
    return cfg


def _type_name(kind: Any) -> str:
    """A config's ``type``: a registry name (``ResNet3d``, ``mmaction.ResNet3d``) or a class."""
    name = kind.__name__ if isinstance(kind, type) else str(kind)
    return name.rsplit(".", 1)[-1]


def adapter_for_backbone(backbone: str) -> type[MmactionAdapter] | None:
    """The adapter that taps a backbone type: by its name, else (a backbone registered by
    the user's own code) by the nearest tapped class it derives from."""
    for adapter in ADAPTERS:
        if backbone in adapter.backbones:
            return adapter
    import_mmaction_models()
    from mmaction.registry import MODELS

    try:
        found = MODELS.get(backbone)
    except Exception:  # noqa: BLE001 - mmengine raises various errors for unknown scopes
        found = None
    for base in getattr(found, "__mro__", ()):
        for adapter in ADAPTERS:
            if base.__name__ in adapter.backbones:
                return adapter
    return None


def _lookup(cfg: Any, dotted: str) -> Any:
    node: Any = {"model": cfg.get("model")}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _pipeline_input(cfg: Config) -> tuple[int | None, int | None]:
    """Frames and crop size of the config's test pipeline (else its validation pipeline)."""
    pipeline: Any = None
    for loader in ("test_dataloader", "val_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        pipeline = dataset.get("pipeline") or (dataset.get("dataset") or {}).get("pipeline")
        if pipeline:
            break
    pipeline = pipeline or cfg.get("test_pipeline") or cfg.get("val_pipeline") or []
    frames = size = resized = None
    two_d = "2D" in _type_name(cfg.model.get("type"))
    for step in pipeline:
        kind = _type_name(step.get("type")) if isinstance(step, dict) else ""
        if kind in _SAMPLERS and frames is None:
            clip_len = step.get("clip_len")
            frames = step.get("num_clips") if two_d and clip_len == 1 else clip_len
        elif kind in _CROPS:
            size = _square(step.get("crop_size"))
        elif kind == "Resize" and step.get("scale") is not None:
            resized = _square(step.get("scale"))
    return (int(frames) if isinstance(frames, int) else None), size or resized


def _square(value: Any) -> int | None:
    """A crop size or resize scale as one side: an int, (s, s), or (-1, s) (short side)."""
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, (list, tuple)):
        sides = {int(v) for v in value if isinstance(v, (int, float)) and v > 0}
        return sides.pop() if len(sides) == 1 else None
    return None


def _input_value(path: Path, what: str, given: int | None, piped: int | None,
                 fixed: list[tuple[str, Any]]) -> int:
    """Frames or size: ``--frames``/``--size`` if given, else what fixes the model's input,
    else the test pipeline's; any two of them that disagree are an error."""
    option = f"--{what}"
    fixed_values = {int(_square(v) or 0) for _, v in fixed}
    if len(fixed_values) > 1:
        listed = ", ".join(f"{k}={v!r}" for k, v in fixed)
        raise LeapsError(f"{path} is inconsistent: {listed}; make them equal")
    model_value = fixed_values.pop() if fixed_values else None
    key = fixed[0][0] if fixed else ""
    if given is not None:
        if given < 1:
            raise LeapsError(f"{option} must be a positive number, got {given}")
        if model_value is not None and given != model_value:
            raise LeapsError(f"{option} {given} conflicts with {key}={model_value} in {path.name}"
                             f": the model is built for {model_value}; drop {option}")
        return given
    if model_value is not None:
        if piped is not None and piped != model_value:
            raise LeapsError(f"{path} is inconsistent: its test pipeline gives {what} {piped} "
                             f"but {key}={model_value}; make them equal")
        return model_value
    if piped is None:
        step = "SampleFrames step with clip_len" if what == "frames" else \
            "CenterCrop (or Resize) step"
        raise LeapsError(f"{path} has no test pipeline {step} to read the input {what} from; "
                         f"pass {option} N")
    return piped


def _triple(path: Path, key: str, value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3  # type: ignore[return-value]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise LeapsError(f"{path}: model.data_preprocessor.{key} must be three numbers "
                         f"(R, G, B), got {value!r}; fix the config")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


ADAPTERS: tuple[type[MmactionAdapter], ...] = (
    SwinAdapter, MViTAdapter, UniFormerV2Adapter, TimeSformerAdapter, X3DAdapter,
    CSNAdapter, R2Plus1DAdapter, SlowOnlyAdapter, I3DAdapter, TSMAdapter,
)


@hookimpl
def leaps_register_adapters(register: Any) -> None:
    for adapter in ADAPTERS:
        register(adapter)
