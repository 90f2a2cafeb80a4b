"""Built-in plugin ``pytorchvideo``: the Kinetics models of pytorchvideo's model zoo.

Families (adapter names):

* ``pytorchvideo.x3d`` (X3D XS/S/M/L), ``pytorchvideo.resnet`` (Slow, C2D, I3D ResNets),
  ``pytorchvideo.r2plus1d`` (R(2+1)D) and ``pytorchvideo.csn`` (channel-separated ResNets):
  all four are pytorchvideo's ResNet-style ``Net`` (a stem, residual stages, a head) and share
  one tap layout;
* ``pytorchvideo.slowfast``: two-pathway SlowFast ResNets, fed the one clip the core gives;
* ``pytorchvideo.mvit``: Multiscale Vision Transformers.

A registry entry's ``arch`` holds the keyword arguments that pytorchvideo's hub builder passes
to the family's ``create_*`` function (``pytorchvideo.models.hub.x3d_xs`` is
``create_x3d(input_clip_length=4, input_crop_size=160)``), so a reduced test variant changes
only the arguments that differ. The CNN builders get YAML lists as tuples, as the hub passes
them; the MViT builder gets lists, as the hub passes those. A string ``nn.<Name>`` names a
``torch.nn`` class (``stem_pool: nn.MaxPool3d``).

The network always returns logits: pytorchvideo's X3D and R(2+1)D heads end in a softmax, which
is left out here (``head_activation=None``); it has no weights, so checkpoints are unaffected.

Native checkpoints are pytorchvideo's hub format ``{"model_state": state_dict}`` (``.pyth``
files; PySlowFast writes the same key next to its optimizer state) or plain state dicts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, Tap, tokens_to_video
from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl


def _resolve(value: Any, lists_as_tuples: bool) -> Any:
    """A YAML arch value as pytorchvideo's builders take it."""
    if isinstance(value, list):
        items = [_resolve(v, lists_as_tuples) for v in value]
        return tuple(items) if lists_as_tuples else items
    if isinstance(value, str) and value.startswith("nn."):
        found = getattr(nn, value[3:], None)
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise LeapsError(f"arch value {value!r} names no torch.nn module class; write e.g. "
                             "'nn.MaxPool3d'")
        return found
    return value


class PytorchvideoAdapter(Adapter):
    """What every pytorchvideo family shares: the network comes from one of pytorchvideo's
    ``create_*`` functions called with the entry's arch, and checkpoints use the hub format.

    Subclasses set ``builder`` (``"module:function"``), the builder's class-count argument and
    how YAML lists reach it, and implement :meth:`taps`.
    """

    requires: ClassVar[dict[str, str]] = {"pytorchvideo": "leaps[pytorchvideo]"}
    checkpoint_format = ("pytorchvideo's hub format ({'model_state': state dict}, .pyth) or a "
                         "plain state dict")
    builder: ClassVar[str] = ""
    num_classes_arg: ClassVar[str] = "model_num_class"
    lists_as_tuples: ClassVar[bool] = True

    def builder_function(self) -> Callable[..., nn.Module]:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)

    def managed_arguments(self, num_classes: int, spec: InputSpec) -> dict[str, Any]:
        """Builder arguments the adapter sets itself: the classifier size, and no softmax."""
        return {self.num_classes_arg: num_classes, "head_activation": None}

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        build = self.builder_function()
        managed = self.managed_arguments(num_classes, spec)
        accepted = set(inspect.signature(build).parameters)
        for key in arch:
            if key in managed:
                raise LeapsError(f"{self.name}: arch sets {key!r}, which the adapter sets "
                                 "itself (classifier size from the label set, logits without "
                                 "an output activation, input size from the entry's input); "
                                 "remove it from arch")
            if key not in accepted:
                close = difflib.get_close_matches(key, sorted(accepted), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LeapsError(f"{self.name}: arch argument {key!r} is not a parameter of "
                                 f"pytorchvideo's {build.__name__}{hint}; fix the registry entry")
        kwargs = {key: _resolve(value, self.lists_as_tuples) for key, value in arch.items()}
        return build(**kwargs, **managed)

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        """Write the hub format, which pytorchvideo's ``pretrained=True`` loaders read."""
        torch.save({"model_state": net.state_dict()}, path)


class ResNetStyleAdapter(PytorchvideoAdapter):
    """pytorchvideo's single-pathway ``Net``: the stem and every residual block of every stage
    are taps, in forward order; the last one (the last block of the last stage) is the
    Grad-CAM target."""

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        from pytorchvideo.models.resnet import ResStage
        from pytorchvideo.models.stem import ResNetBasicStem

        taps = []
        for i, block in enumerate(net.blocks):
            if isinstance(block, ResNetBasicStem):
                taps.append(Tap(f"blocks.{i}", block))
            elif isinstance(block, ResStage):
                taps.extend(Tap(f"blocks.{i}.res_blocks.{j}", res)
                            for j, res in enumerate(block.res_blocks))
        return taps


class X3DAdapter(ResNetStyleAdapter):
    """X3D (XS/S/M/L are arch arguments of ``create_x3d``)."""

    name = "pytorchvideo.x3d"
    builder = "pytorchvideo.models.x3d:create_x3d"


class ResNetAdapter(ResNetStyleAdapter):
    """3D ResNets built by ``create_resnet``: Slow (the paper's "3D R50"), C2D, I3D."""

    name = "pytorchvideo.resnet"
    builder = "pytorchvideo.models.resnet:create_resnet"


class R2plus1DAdapter(ResNetStyleAdapter):
    """R(2+1)D ResNets built by ``create_r2plus1d``."""

    name = "pytorchvideo.r2plus1d"
    builder = "pytorchvideo.models.r2plus1d:create_r2plus1d"


class CSNAdapter(ResNetStyleAdapter):
    """Channel-separated ResNets built by ``create_csn``."""

    name = "pytorchvideo.csn"
    builder = "pytorchvideo.models.csn:create_csn"


def pack_pathways(video: Tensor, alpha: int) -> list[Tensor]:
    """One ``[B,C,T,H,W]`` clip -> SlowFast's ``[slow, fast]`` inputs, as pytorchvideo's own
    ``PackPathway`` recipe does: fast = every frame, slow = ``T // alpha`` frames spread evenly
    over the clip (first and last included)."""
    frames = video.shape[2]
    if frames < alpha:
        raise LeapsError(f"SlowFast needs at least alpha={alpha} frames, got {frames}; raise "
                         "the clip's frame count")
    index = torch.linspace(0, frames - 1, frames // alpha, device=video.device).long()
    return [video.index_select(2, index), video]


def merge_pathways(pathways: Sequence[Tensor]) -> Tensor:
    """``[slow, fast, ...]`` block outputs -> one ``[B, C_slow + C_fast, T_slow, H, W]`` tensor.

    Every pathway is average-pooled to the slow pathway's grid (the fast one over its ``alpha``
    extra frames) and the channels are concatenated. Averaging keeps each channel's mean over
    T, H, W unchanged, so the priming embedding of the merged tap is exactly the two pathways'
    channel means side by side - the way pytorchvideo's own head combines them (it pools each
    pathway and concatenates channels). The frames left are real, not repeated, so the
    temporal-coherence term sees honest frame-to-frame change at the slow rate.
    """
    grid = pathways[0].shape[2:]
    pooled = [p if p.shape[2:] == grid else nn.functional.adaptive_avg_pool3d(p, grid)
              for p in pathways]
    return torch.cat(pooled, dim=1)


class SlowFastAdapter(PytorchvideoAdapter):
    """SlowFast ResNets (``create_slowfast``).

    :meth:`forward` packs the one clip the core optimises into the two pathways
    (:func:`pack_pathways`); ``alpha`` is read off the network (the temporal stride of its
    fast-to-slow fusion convolution), so it always matches the architecture.

    Taps are the fused blocks - the stem and each of the four stages, after the fast-to-slow
    lateral fusion - because their output is what the network carries forward: a residual
    block of one pathway alone is half of the representation (appearance without motion or
    the reverse), and the two pathways' blocks run at different times, so no single module
    sees both. Each tap's ``[slow, fast]`` output becomes one tensor by
    :func:`merge_pathways`. The Grad-CAM target is the last stage's fused block (a tap, read
    through the same conversion).
    """

    name = "pytorchvideo.slowfast"
    builder = "pytorchvideo.models.slowfast:create_slowfast"

    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        return net(pack_pathways(x, slowfast_alpha(net)))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        from pytorchvideo.models.net import MultiPathWayWithFuse

        return [Tap(f"blocks.{i}", block, merge_pathways) for i, block in enumerate(net.blocks)
                if isinstance(block, MultiPathWayWithFuse)]


def slowfast_alpha(net: nn.Module) -> int:
    """The slow/fast frame-rate ratio of a pytorchvideo SlowFast network."""
    return int(net.blocks[0].multipathway_fusion.conv_fast_to_slow.stride[0])


class MViTAdapter(PytorchvideoAdapter):
    """Multiscale Vision Transformers (``create_multiscale_vision_transformers``).

    The positional embeddings depend on the input size, so the network is built for the
    entry's frames and crop (``temporal_size``/``spatial_size`` come from the input spec).
    Every multiscale block is a tap; its tokens go back onto their T x H x W grid, the class
    token dropped. Norm layers are LayerNorms (statistics estimated from videos).
    """

    name = "pytorchvideo.mvit"
    builder = "pytorchvideo.models.vision_transformers:create_multiscale_vision_transformers"
    num_classes_arg = "head_num_classes"
    lists_as_tuples = False

    def managed_arguments(self, num_classes: int, spec: InputSpec) -> dict[str, Any]:
        return {**super().managed_arguments(num_classes, spec),
                "spatial_size": spec.size, "temporal_size": spec.frames}

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(f"blocks.{i}", block, _token_grid(int(block.has_cls_embed)))
                for i, block in enumerate(net.blocks)]


def _token_grid(prefix: int) -> Callable[[tuple[Tensor, list[int]]], Tensor]:
    def to_video(output: tuple[Tensor, list[int]]) -> Tensor:
        tokens, thw = output
        return tokens_to_video(tokens, (thw[0], thw[1], thw[2]), prefix=prefix)
    return to_video


@hookimpl
def leaps_register_adapters(register: Any) -> None:
    for adapter in (X3DAdapter, ResNetAdapter, R2plus1DAdapter, CSNAdapter, SlowFastAdapter,
                    MViTAdapter):
        register(adapter)
