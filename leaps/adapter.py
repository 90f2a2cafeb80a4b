"""The Adapter contract: what one model family must tell the core, and nothing more.

An adapter turns a family's network into a :class:`VideoClassifier`: a module that takes
pixels in ``[0, 1]`` shaped ``[B, 3, T, H, W]`` and returns logits, and that carries

* its :class:`InputSpec` (frames, crop size, mean/std, value range, class names);
* its ordered :class:`Tap` list - every embedding layer from the first block to the last, each
  with a function turning the module's output into ``[B, C, T', H', W']``;
* its :class:`NormLayer` list - the layers whose input statistics the feature-diversity term
  matches (BatchNorm running stats, or LayerNorm inputs whose stats are estimated from videos);
* the name of a default Grad-CAM layer.

A family implements :meth:`Adapter.create` and :meth:`Adapter.taps`; everything else has a
default that fits most families. ``docs/writing_adapters.md`` walks through a complete one.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from leaps.errors import LeapsError
from leaps.files import load_torch_file, why_unreadable

if TYPE_CHECKING:
    from leaps.registry import ModelSpec


@dataclass(frozen=True)
class InputSpec:
    """What the network expects. ``mean``/``std`` apply to pixels scaled to ``value_range``."""

    frames: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    value_range: float = 1.0
    layout: str = "BCTHW"
    labels: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(3, T, H, W)`` of one clip."""
        return (3, self.frames, self.size, self.size)


def as_video(output: Any) -> Tensor:
    """Default tap conversion: the module already returns ``[B, C, T, H, W]``."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output


def tokens_to_video(tokens: Tensor, grid: tuple[int, int, int], prefix: int = 0,
                    order: str = "thw") -> Tensor:
    """``[B, prefix + T*H*W, C]`` tokens -> ``[B, C, T, H, W]``, dropping the ``prefix`` class
    tokens.

    ``grid`` is ``(T, H, W)`` of the patch grid whatever the order. ``order`` names the token
    sequence's axes from the slowest to the fastest: ``"thw"`` (time-major: all patches of the
    first frame, then the second frame's ... - ViViT, VideoMAE, Video Swin flattened) or
    ``"hwt"`` (space-major: every frame of the first patch, then the next patch - TimeSformer's
    divided space-time layout). Reading tokens in the wrong order scrambles the grid without any
    shape error; the conformance suite's locality check catches it.
    """
    if sorted(order) != ["h", "t", "w"]:
        raise ValueError(f"order must be a permutation of 't', 'h', 'w', got {order!r}")
    sizes = dict(zip("thw", grid))
    tokens = tokens[:, prefix:]
    if tokens.shape[1] != sizes["t"] * sizes["h"] * sizes["w"]:
        raise ValueError(f"{tokens.shape[1]} tokens do not fit the patch grid "
                         f"{sizes['t']}x{sizes['h']}x{sizes['w']}")
    batch, channels = tokens.shape[0], tokens.shape[2]
    laid_out = tokens.reshape(batch, *(sizes[axis] for axis in order), channels)
    # -> [B, C, T, H, W]: channels first, then the grid axes in t, h, w order
    return laid_out.permute(0, 4, *(1 + order.index(axis) for axis in "thw"))


def channels_last_to_video(x: Tensor) -> Tensor:
    """``[B, T, H, W, C]`` -> ``[B, C, T, H, W]``."""
    return x.permute(0, 4, 1, 2, 3)


@dataclass(frozen=True)
class ConfigModel:
    """What an adapter reads from a config file of its library (``leaps invert --config``):
    the registry fields of the model the file describes, found in the file itself."""

    arch: dict[str, Any]                 # what the adapter builds from (e.g. the config path)
    frames: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    value_range: float
    num_classes: int | None              # the classifier's outputs, when the file says
    describes: str                       # what the file builds, for messages ("a X3D ...")


@dataclass
class Tap:
    """One embedding layer: the module whose output is captured, and how to read it as video."""

    name: str
    module: nn.Module
    to_video: Callable[[Any], Tensor] = as_video


@dataclass
class NormLayer:
    """A normalisation layer whose *input* statistics R_feat matches.

    ``channel_dim`` is the channel axis of the layer's input (1 for BatchNorm on
    ``[B, C, ...]``, -1 for LayerNorm on ``[..., C]``). ``running_mean``/``running_var`` are the
    statistics to match; ``None`` means the family has none (BN-free) and they are estimated from
    real videos by the caller.
    """

    name: str
    module: nn.Module
    channel_dim: int
    running_mean: Tensor | None = None
    running_var: Tensor | None = None

    @property
    def has_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None


class VideoClassifier(nn.Module):
    """What every adapter hands the core: pixels in [0,1] ``[B,3,T,H,W]`` -> logits ``[B,K]``.

    Normalisation to the network's mean/std happens inside :meth:`forward`, so optimisers and
    attribution methods work in pixel space whatever the family.
    """

    def __init__(self, net: nn.Module, spec: InputSpec, taps: list[Tap],
                 norm_layers: list[NormLayer], gradcam_layer: str,
                 forward_fn: Callable[[nn.Module, Tensor], Tensor],
                 adapter: str, model: str) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.taps = taps
        self.norm_layers = norm_layers
        self.gradcam_layer = gradcam_layer
        self._forward_fn = forward_fn
        self.adapter_name = adapter
        self.model_name = model
        scale = spec.value_range
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1, 1) / scale,
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1, 1) / scale,
                             persistent=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    def normalize(self, video: Tensor) -> Tensor:
        return (video - self.mean) / self.std

    def forward(self, video: Tensor) -> Tensor:
        return self._forward_fn(self.net, self.normalize(video))

    def tap(self, name: str) -> Tap:
        for tap in self.taps:
            if tap.name == name:
                return tap
        names = ", ".join(t.name for t in self.taps)
        raise LeapsError(f"{self.model_name} has no tap {name!r}; its taps are: {names}")


def _batchnorm_layers(net: nn.Module) -> list[NormLayer]:
    layers = []
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            layers.append(NormLayer(name, module, 1, module.running_mean, module.running_var))
    return layers


def _layernorm_layers(net: nn.Module) -> list[NormLayer]:
    return [NormLayer(name, module, -1) for name, module in net.named_modules()
            if isinstance(module, nn.LayerNorm)]


class Adapter:
    """Base class of every model-family adapter. Subclass, set the class attributes, and
    implement :meth:`create` and :meth:`taps`.

    Class attributes:
      name: ``"<plugin>.<family>"``, e.g. ``"torchvision.r3d"``.
      requires: importable module -> the pip requirement that provides it (``"transformers"``,
        ``"mmaction2==1.2.0"``; leaps' built-in adapters name their extra, ``"leaps[timm]"``).
        ``leaps models`` reports an entry as unusable while a module is missing and prints
        ``pip install '<requirement>'``.
      checkpoint_format: a short description of the native checkpoint format it loads.
      checkpoint_files: file names looked for, in this order, when ``--checkpoint`` is a folder
        (what a library's saver writes, e.g. ``("model.safetensors", "pytorch_model.bin")`` of a
        Hugging Face ``save_pretrained`` folder); empty: checkpoints are single files.
      checkpoint_safe_globals: what ``torch.load(weights_only=True)`` may unpickle besides
        tensors and containers - the family's checkpoints carry more than weights (training
        bookkeeping such as numpy scalars or a library's own classes). Entries are what
        ``torch.serialization.safe_globals`` takes: a class or function, or a
        ``(stand_in, "module.qualname")`` pair that unpickles the named global as ``stand_in``
        (an inert placeholder keeps the library's code from running).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[dict[str, str]] = {}
    checkpoint_format: ClassVar[str] = "a state dict saved by torch.save (.pth) or safetensors"
    checkpoint_safe_globals: ClassVar[list[Any]] = []
    checkpoint_files: ClassVar[tuple[str, ...]] = ()

    # -- what a family implements ------------------------------------------------------
    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        """Build the family's network with random weights (never downloads anything)."""
        raise NotImplementedError

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        """Every embedding layer in forward order, first block to last."""
        raise NotImplementedError

    # -- defaults a family may override -----------------------------------------------
    @classmethod
    def read_config(cls, path: Path, frames: int | None = None, size: int | None = None,
                    forced: bool = False) -> ConfigModel | None:
        """The model a config file of this adapter's library describes, when this adapter
        builds it (``leaps invert --config FILE``); None when the file is not such a config.

        ``frames``/``size`` override what the file says (the user's ``--frames``/``--size``);
        ``forced`` means the user named this adapter (``--adapter``), so a config of its
        library is taken whatever architecture it builds. Raises :class:`LeapsError` (one line
        naming the file and the fix) for a config of its library that it cannot use: broken,
        inconsistent, or of an architecture that no adapter of the library taps."""
        return None

    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        """Run the network on a normalised ``[B,3,T,H,W]`` clip; return logits."""
        return net(x)

    def norm_layers(self, net: nn.Module) -> list[NormLayer]:
        """BatchNorm layers with running stats; LayerNorms (stats estimated) for BN-free nets."""
        return _batchnorm_layers(net) or _layernorm_layers(net)

    def gradcam_layer(self, net: nn.Module, taps: list[Tap]) -> str:
        """Name of the default Grad-CAM target: the last tap."""
        return taps[-1].name

    def state_dict_from_checkpoint(self, obj: Any, net: nn.Module | None = None
                                   ) -> dict[str, Tensor]:
        """Pull the weights out of a loaded checkpoint object (family formats differ).

        ``net`` is the network being loaded (already built): a family whose files use other key
        names than its modules (a library's on-disk renames, a prefix) maps them with it. An
        override may leave ``net`` out of its signature (the original contract); it is then
        called with ``obj`` alone.
        """
        if isinstance(obj, dict):
            for key in ("state_dict", "model_state", "model"):
                if key in obj and isinstance(obj[key], dict):
                    return obj[key]
        return obj

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        """Write ``net`` in the family's native checkpoint format."""
        torch.save(net.state_dict(), path)

    def save_native(self, net: nn.Module, directory: Path) -> Path | None:
        """Save ``net`` with the model library's *own* saver (not leaps' code) under
        ``directory`` and return what a user passes to ``--checkpoint`` (a file or a folder).

        The conformance suite loads it back: real checkpoints come from the library's saver,
        so this is the round trip that shows real files load. None (the default): the family
        has no saver of its own beyond :meth:`save_checkpoint`.
        """
        return None

    def arch_from_checkpoint(self, arch: dict[str, Any], path: Path) -> dict[str, Any]:
        """The architecture arguments to build for checkpoint ``path`` (the file
        :meth:`checkpoint_file` picked): by default the entry's ``arch``. A family whose
        checkpoints carry their configuration (a ``config.json`` beside the weights) merges it
        in, so a fine-tune of another size needs no registry entry of its own."""
        return arch

    # -- the template the core calls ----------------------------------------------------
    def checkpoint_file(self, path: str | Path) -> Path:
        """The file :meth:`load_checkpoint` reads for ``path``: the path itself, or inside a
        folder the first of :attr:`checkpoint_files` that exists (its sha256 is what a run
        records)."""
        path = Path(path)
        if path.is_dir():
            if not self.checkpoint_files:
                raise LeapsError(f"checkpoint {path} is a folder; {self.name} loads a file "
                                 f"({self.checkpoint_format}): pass the file to --checkpoint")
            for name in self.checkpoint_files:
                if (path / name).is_file():
                    return path / name
            raise LeapsError(f"checkpoint folder {path} holds none of "
                             f"{', '.join(self.checkpoint_files)}; pass the folder the "
                             "library saved (or one of those files) to --checkpoint")
        if not path.is_file():
            raise LeapsError(f"checkpoint {path} does not exist; pass an existing file"
                             + (" or folder" if self.checkpoint_files else "")
                             + " to --checkpoint")
        return path

    def load_checkpoint(self, net: nn.Module, path: str | Path) -> None:
        """Load a native checkpoint (a file, or a folder holding one of
        :attr:`checkpoint_files`) into ``net`` without executing code from the file."""
        given = Path(path)
        path = self.checkpoint_file(given)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj: Any = load_file(str(path))
            else:
                obj = load_torch_file(path, self.checkpoint_safe_globals)
        except LeapsError as exc:
            raise LeapsError(f"cannot read checkpoint {path}: it {exc}; {self.name} loads "
                             f"{self.checkpoint_format}") from None
        except Exception as exc:  # noqa: BLE001 - whatever a bad file makes the loader raise
            raise LeapsError(f"cannot read checkpoint {path}: it {why_unreadable(path, exc)}; "
                             f"{self.name} loads {self.checkpoint_format}") from None
        state = self._state_dict(obj, net)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise LeapsError(f"checkpoint {path} holds no state dict of tensors; {self.name} "
                             f"loads {self.checkpoint_format}")
        load_state_dict_checked(net, state, str(path))

    def _state_dict(self, obj: Any, net: nn.Module) -> Any:
        """:meth:`state_dict_from_checkpoint`, handed ``net`` when its signature takes it."""
        try:
            params = inspect.signature(self.state_dict_from_checkpoint).parameters
        except (TypeError, ValueError):
            params = {}
        takes_net = "net" in params or len([
            p for p in params.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2 or any(
            p.kind is p.VAR_POSITIONAL for p in params.values())
        if takes_net:
            return self.state_dict_from_checkpoint(obj, net)
        return self.state_dict_from_checkpoint(obj)

    def build(self, spec: ModelSpec, checkpoint: str | Path | None = None,
              labels: tuple[str, ...] | None = None) -> VideoClassifier:
        """Build the registry entry's model in eval mode, optionally loading ``checkpoint``.

        ``labels`` replaces the entry's label set (a model fine-tuned on other classes); the
        classifier is then sized to it.
        """
        input_spec = spec.input_spec(labels)
        arch = dict(spec.arch)
        if checkpoint is not None:
            arch = self.arch_from_checkpoint(arch, self.checkpoint_file(checkpoint))
        net = self.create(dict(arch), len(input_spec.labels), input_spec)
        if checkpoint is not None:
            self.load_checkpoint(net, checkpoint)
        net.eval()
        taps = self.taps(net, dict(arch), input_spec)
        if not taps:
            raise LeapsError(f"adapter {self.name} found no taps in {spec.name}")
        classifier = VideoClassifier(net, input_spec, taps, self.norm_layers(net),
                                     self.gradcam_layer(net, taps), self.forward, self.name,
                                     spec.name)
        return classifier.eval()


def load_state_dict_checked(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected or mis-shaped key at once."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch (checkpoint vs model)", mismatched)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        hint = ("; the classifier size differs from the label set: pass --labels FILE with the "
                "model's classes" if _only_the_head_differs(own, state, mismatched, missing,
                                                            unexpected) else
                "; is it a checkpoint of this model family and variant?")
        raise LeapsError(f"checkpoint {source} does not fit the model: {'; '.join(parts)}{hint}")
    _check_values(own, state, source)
    net.load_state_dict(state, strict=True)


def _check_values(own: dict[str, Tensor], state: dict[str, Tensor], source: str) -> None:
    """Weights that would load but make every loss non-finite: integer (quantized) tensors
    for float parameters, NaN or inf values. Named here, so no run blames its --lr."""
    integer = [f"{k} ({state[k].dtype})".replace("torch.", "") for k in own
               if own[k].is_floating_point() and not state[k].is_floating_point()]
    if integer:
        more = f" (+{len(integer) - 3} more)" if len(integer) > 3 else ""
        raise LeapsError(f"checkpoint {source} holds integer tensors for float parameters: "
                         f"{', '.join(integer[:3])}{more}; a quantized checkpoint? leaps needs "
                         "the float weights (dequantize it, or use the float checkpoint)")
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise LeapsError(f"checkpoint {source} holds NaN or infinite values in "
                         f"{', '.join(bad[:3])}{more}: it is damaged or was saved from a diverged "
                         "training; use another checkpoint")


def _only_the_head_differs(own: dict[str, Tensor], state: dict[str, Tensor],
                           mismatched: list[str], missing: list[str],
                           unexpected: list[str]) -> bool:
    """Every key fits but the classifier's (the last weight and bias, whose first dimension is
    the number of classes): a model fine-tuned on another label set, not another model."""
    if missing or unexpected or not mismatched:
        return False
    head = [k for k in own if own[k].dim() >= 1][-2:]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    return set(wrong) <= set(head) and all(
        state[k].shape[1:] == own[k].shape[1:] for k in wrong)


def untrained_statistics(model: VideoClassifier) -> bool:
    """Whether every BatchNorm of ``model`` still holds its initial running statistics (mean 0,
    variance 1): random weights, whose R_feat targets say nothing about real videos."""
    layers = [layer for layer in model.norm_layers if layer.has_stats]
    return bool(layers) and all(
        bool((layer.running_mean == 0).all()) and bool((layer.running_var == 1).all())
        for layer in layers)


def checkpoint_sha256(adapter: str, path: str | Path) -> str | None:
    """sha256 of the file adapter ``adapter`` loads for checkpoint ``path`` (inside a folder:
    the weights file it picks), or None when there is none."""
    from leaps.plugins import get_host

    try:
        file = get_host().adapter(adapter)().checkpoint_file(path)
    except LeapsError:
        return None
    return sha256_file(file)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

