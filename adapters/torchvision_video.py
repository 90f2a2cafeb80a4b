"""Built-in plugin ``torchvision``: torchvision's video classification models.

Families (adapter names): ``torchvision.r3d`` (VideoResNet: r3d_18, mc3_18, r2plus1d_18),
``torchvision.s3d``, ``torchvision.mvit`` (mvit_v1_b, mvit_v2_s) and ``torchvision.swin3d``
(swin3d_t/s/b). Native checkpoints are plain state dicts, as torchvision publishes them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leaps.adapter import Adapter, InputSpec, Tap, channels_last_to_video, tokens_to_video
from leaps.hookspecs import hookimpl


def _builder(arch: dict[str, Any]) -> Any:
    from torchvision.models import video

    name = arch.get("builder")
    if not isinstance(name, str) or not hasattr(video, name):
        raise ValueError(f"arch.builder must name a torchvision.models.video builder, got {name!r}")
    return getattr(video, name)


def _kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arch.items() if k != "builder"}


class VideoResNetAdapter(Adapter):
    """r3d_18, mc3_18, r2plus1d_18: the stem and every residual block are taps."""

    name = "torchvision.r3d"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        return _builder(arch)(weights=None, num_classes=num_classes, **_kwargs(arch))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        taps = [Tap("stem", net.stem)]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(net, layer)):
                taps.append(Tap(f"{layer}.{i}", block))
        return taps


class S3DAdapter(Adapter):
    """S3D: every separable-conv and inception block of ``features`` is a tap.

    ``arch.global_pool: true`` swaps the fixed 2x7x7 average pool for a global one, so that the
    network accepts inputs smaller than 16x224x224 (used for reduced-size tests; identical on
    the native input size).
    """

    name = "torchvision.s3d"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        kwargs = _kwargs(arch)
        global_pool = kwargs.pop("global_pool", False)
        net = _builder(arch)(weights=None, num_classes=num_classes, **kwargs)
        if global_pool:
            net.avgpool = nn.AdaptiveAvgPool3d(1)
        return net

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(f"features.{i}", m) for i, m in enumerate(net.features)
                if not isinstance(m, nn.MaxPool3d)]


class MViTAdapter(Adapter):
    """MViT v1/v2: every multiscale block is a tap; tokens go back onto their T x H x W grid
    (the class token dropped). The network is built for the entry's input size."""

    name = "torchvision.mvit"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        from unittest import mock

        import torchvision.models.video.mvit as tv_mvit

        # The public builders hard-code 16x224x224 when they call _mvit; the positional
        # embeddings depend on the input size, so the size is set where the net is made.
        make = tv_mvit._mvit

        def sized(**kwargs: Any) -> nn.Module:
            kwargs.update(spatial_size=(spec.size, spec.size), temporal_size=spec.frames)
            return make(**kwargs)

        with mock.patch.object(tv_mvit, "_mvit", sized):
            return _builder(arch)(weights=None, num_classes=num_classes, **_kwargs(arch))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        def to_video(output: tuple[Any, list[int]]) -> Any:
            tokens, thw = output
            return tokens_to_video(tokens, tuple(thw), prefix=1)

        return [Tap(f"blocks.{i}", block, to_video) for i, block in enumerate(net.blocks)]


class Swin3DAdapter(Adapter):
    """Video Swin: every transformer block is a tap; its channels-last output is permuted."""

    name = "torchvision.swin3d"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        return _builder(arch)(weights=None, num_classes=num_classes, **_kwargs(arch))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        from torchvision.models.video.swin_transformer import PatchMerging

        taps = []
        for i, stage in enumerate(net.features):
            if isinstance(stage, PatchMerging):
                continue
            for j, block in enumerate(stage):
                taps.append(Tap(f"features.{i}.{j}", block, channels_last_to_video))
        return taps


@hookimpl
def leaps_register_adapters(register: Any) -> None:
    for adapter in (VideoResNetAdapter, S3DAdapter, MViTAdapter, Swin3DAdapter):
        register(adapter)
