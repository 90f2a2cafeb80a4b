"""Built-in plugin ``timm``: any timm image model as a frame-wise (TSN-style) video classifier.

Adapter ``timm.frames``: the image model sees every frame on its own (time folded into the
batch) and the clip's logits are the mean of the frames' logits - how an ImageNet model is
fine-tuned on Kinetics frame by frame. Taps follow timm's feature contract (each model's
``feature_info``), refined to every block, with time restored so that each tap reads as
``[B, C, T, H, W]``. Native checkpoints are timm's: a plain state dict (``.pth``/``.bin`` by
``torch.save``, or ``.safetensors``), or a training checkpoint that nests one.

``arch`` of a registry entry: ``model`` (a timm model name, ``timm.list_models()``) plus any
keyword arguments of that model (``depth``, ``drop_path_rate`` ...).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, NormLayer, Tap
from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl

# The clip shape (T, H, W) of the forward in progress, kept on the image model so that tap
# conversions (which only see the folded [B*T, ...] output) can restore time and the patch grid.
_CLIP_ATTR = "_leaps_clip_shape"

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_LAYERNORM_2D = ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32")


def pretrained_input(model: str) -> dict[str, Any]:
    """The ``input:`` fields (size, mean, std) of a registry entry, from timm's pretrained config
    of ``model`` - what its published weights expect."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        raise LeapsError(f"timm has no pretrained config for {model!r}; give input.size, "
                         "input.mean and input.std in the registry entry yourself")
    return {"size": int(cfg.input_size[-1]), "mean": [float(v) for v in cfg.mean],
            "std": [float(v) for v in cfg.std]}


def _model_name(arch: dict[str, Any]) -> str:
    import timm

    name = arch.get("model")
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LeapsError(f"arch.model must name a timm model, got {name!r}{hint}; "
                         "timm.list_models('pattern*') lists them")
    return name


def _feature_modules(net: nn.Module) -> list[tuple[str, int]]:
    """timm's feature_info as (module name, reduction), with the stages it skips filled in.

    Some families list only the stages where the resolution changes (EfficientNet lists
    blocks.0, 1, 2, 4, 6); the paper primes every layer, so the skipped siblings come back.
    """
    info = getattr(net, "feature_info", None)
    entries = getattr(info, "info", info)
    if not entries:
        raise LeapsError(f"timm model {type(net).__name__} has no feature_info; timm.frames needs "
                         "timm's feature contract to find its blocks")
    listed = [(str(e["module"]), int(e["reduction"])) for e in entries]
    filled: list[tuple[str, int]] = []
    for name, reduction in listed:
        match = re.fullmatch(r"(.+)\.(\d+)", name)
        if match and filled:
            prev = re.fullmatch(r"(.+)\.(\d+)", filled[-1][0])
            if prev and prev.group(1) == match.group(1):
                for i in range(int(prev.group(2)) + 1, int(match.group(2))):
                    filled.append((f"{match.group(1)}.{i}", reduction))
        filled.append((name, reduction))
    return filled


def _blocks(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A stage as its blocks: the children of a container (or of its ``blocks``), recursively."""
    if isinstance(module, _CONTAINERS) and len(module) > 0:
        return [b for i, child in enumerate(module) for b in _blocks(f"{name}.{i}", child)]
    inner = getattr(module, "blocks", None)
    if isinstance(inner, _CONTAINERS) and len(inner) > 0:
        return _blocks(f"{name}.blocks", inner)
    return [(name, module)]


def _unfold(net: nn.Module, reduction: int, prefix: int, channels_last: bool
            ) -> Callable[[Any], Tensor]:
    """Tap conversion: a per-frame output ``[B*T, C, H, W]`` (``[B*T, H, W, C]`` for NHWC
    families, ``[B*T, prefix + H*W, C]`` tokens for ViTs) -> ``[B, C, T, H, W]``."""

    def to_video(output: Any) -> Tensor:
        if isinstance(output, (tuple, list)):
            output = output[0]
        t, height, width = getattr(net, _CLIP_ATTR)
        nhwc = channels_last
        if output.dim() == 3:
            grid = (height // reduction, width // reduction)
            tokens = output[:, prefix:]
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"{output.shape[1]} tokens ({prefix} prefix) do not fit the "
                                 f"{grid[0]}x{grid[1]} patch grid of a {height}x{width} frame")
            output = tokens.reshape(tokens.shape[0], *grid, tokens.shape[2])
            nhwc = True
        frames = output.reshape(-1, t, *output.shape[1:])
        return frames.permute(0, 4, 1, 2, 3) if nhwc else frames.transpose(1, 2)

    return to_video


class FramesAdapter(Adapter):
    """A timm image model applied frame by frame; clip logits are the mean over frames."""

    name = "timm.frames"
    requires: ClassVar[dict[str, str]] = {"timm": "leaps[timm]"}
    checkpoint_format = ("a timm state dict (.pth/.bin by torch.save, or .safetensors), or a "
                         "training checkpoint nesting one under 'state_dict'/'state_dict_ema' "
                         "(strip pickled training args first with timm's clean_checkpoint.py)")

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        import timm

        model = _model_name(arch)
        kwargs = {k: v for k, v in arch.items() if k != "model"}
        cfg = timm.models.get_pretrained_cfg(model)
        # Position embeddings of fixed-size models (ViT, Swin) are sized to the input.
        if cfg is not None and cfg.fixed_input_size and "img_size" not in kwargs:
            kwargs["img_size"] = spec.size
        try:
            return timm.create_model(model, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise LeapsError(f"timm model {model!r} rejects the arch arguments "
                             f"{sorted(kwargs)}: {exc}; fix the entry's arch") from None

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        setattr(net, _CLIP_ATTR, (spec.frames, spec.size, spec.size))
        prefix = int(getattr(net, "num_prefix_tokens", 0))
        channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"
        modules = dict(net.named_modules())
        taps = []
        for stage, reduction in _feature_modules(net):
            for name, block in _blocks(stage, modules[stage]):
                taps.append(Tap(name, block, _unfold(net, reduction, prefix, channels_last)))
        return taps

    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        setattr(net, _CLIP_ATTR, (t, h, w))
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        return net(frames).view(b, t, -1).mean(1)

    def norm_layers(self, net: nn.Module) -> list[NormLayer]:
        """BatchNorm with running stats; for BN-free models their LayerNorms, where timm's
        channels-first LayerNorm2d variants (ConvNeXt ...) normalise dim 1, not the last."""
        import timm.layers

        channels_first = tuple(getattr(timm.layers, n) for n in _LAYERNORM_2D
                               if hasattr(timm.layers, n))
        layers = super().norm_layers(net)
        for layer in layers:
            if isinstance(layer.module, channels_first):
                layer.channel_dim = 1
        return layers

    def state_dict_from_checkpoint(self, obj: Any) -> dict[str, Tensor]:
        from timm.models import clean_state_dict

        # timm's own preference: EMA weights when a training checkpoint carries them.
        if isinstance(obj, dict):
            for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        return clean_state_dict(obj) if isinstance(obj, dict) else obj

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        state = net.state_dict()
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)


@hookimpl
def leaps_register_adapters(register: Any) -> None:
    register(FramesAdapter)
