"""Forward hooks that capture what the LEAPS terms read: tap embeddings and norm-layer stats.

Hooks reduce on the spot (mean embeddings, per-frame vectors, channel statistics), so nothing
beyond what autograd already keeps stays alive, and nothing leaves the device.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from leaps.adapter import NormLayer, Tap
from leaps.losses import (
    batch_norm_scale,
    batch_norm_sums,
    channel_stats,
    embedding_mean,
    frame_vectors,
    moments_from_sums,
)


class _Hooks:
    def __init__(self) -> None:
        self._handles: list[Any] = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TapRecorder(_Hooks):
    """Records mu(z_l) ``[B, C]`` for the given taps and per-frame vectors ``[B, C, T]`` of the
    last one. Call :meth:`reset` before each forward; a module that runs twice in one forward
    is read the first time."""

    def __init__(self, taps: list[Tap], frames_of: Tap | None = None) -> None:
        super().__init__()
        self.taps = taps
        self.embeddings: list[Tensor | None] = [None] * len(taps)
        self.frames: Tensor | None = None
        for i, tap in enumerate(taps):
            self._handles.append(tap.module.register_forward_hook(self._embedding_hook(i, tap)))
        if frames_of is not None:
            self._handles.append(frames_of.module.register_forward_hook(self._frames_hook(frames_of)))

    def reset(self) -> None:
        self.embeddings = [None] * len(self.taps)
        self.frames = None

    def _embedding_hook(self, index: int, tap: Tap) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.embeddings[index] is None:
                self.embeddings[index] = embedding_mean(tap.to_video(output))
        return hook

    def _frames_hook(self, tap: Tap) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.frames is None:
                self.frames = frame_vectors(tap.to_video(output))
        return hook

    def collected(self) -> list[Tensor]:
        missing = [t.name for t, e in zip(self.taps, self.embeddings) if e is None]
        if missing:
            raise RuntimeError(f"taps did not run in forward: {missing}")
        return self.embeddings  # type: ignore[return-value]


class NormStatsRecorder(_Hooks):
    """Records the per-channel mean/variance of each norm layer's input in a forward.

    A forward hook reads each layer's input. On a plain inference-mode BatchNorm
    (``torch.nn.BatchNorm*d`` itself, not a subclass with a forward of its own, in eval mode,
    with running statistics, channels on axis 1 and a frozen affine) the hook also hands back
    the layer's output re-attached through :func:`batch_norm_sums`, so that the input's
    gradient from the layer and from the statistics is written once, and keeps the raw sums;
    :meth:`moments` turns all layers' sums into statistics at once. Everything else (LayerNorm,
    subclasses, a layer in training mode) keeps its output and gets :func:`channel_stats`.
    ``fused[l]`` says which way layer l was read. A module that runs twice in one forward is
    read the first time.
    """

    def __init__(self, layers: list[NormLayer]) -> None:
        super().__init__()
        self.layers = layers
        # per layer: (sums [R, C], squares [R, C], elements per channel) when fused, else
        # (mean [C], var [C])
        self.stats: list[tuple[Any, ...] | None] = [None] * len(layers)
        self.fused: list[bool] = [False] * len(layers)
        for i, layer in enumerate(layers):
            self._handles.append(layer.module.register_forward_hook(self._hook(i, layer)))

    def reset(self) -> None:
        self.stats = [None] * len(self.layers)

    def _hook(self, index: int, layer: NormLayer) -> Any:
        fusable = layer.channel_dim == 1 and _is_plain_batch_norm(layer.module)
        scales: dict[Any, Tensor] = {}  # the layer's s, per device, dtype and state of its stats

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if self.stats[index] is not None:
                return None
            x = inputs[0]
            self.fused[index] = fusable and not module.training and not any(
                p.requires_grad for p in module.parameters(recurse=False))
            if self.fused[index]:
                weight = module.weight
                key = (x.device, x.dtype, x.dim(), module.running_var._version,
                       None if weight is None else weight._version)
                if key not in scales:
                    scales.clear()
                    scales[key] = batch_norm_scale(weight, module.running_var, module.eps, x)
                output, sums, squares = batch_norm_sums(x, output, scales[key])
                self.stats[index] = (sums, squares, x.numel() // x.shape[1])
                return output
            self.stats[index] = channel_stats(x, layer.channel_dim)
            return None
        return hook

    def _recorded(self) -> list[tuple[Any, ...]]:
        missing = [layer.name for layer, s in zip(self.layers, self.stats) if s is None]
        if missing:
            raise RuntimeError(f"norm layers did not run in forward: {missing}")
        return self.stats  # type: ignore[return-value]

    def moments(self) -> tuple[Tensor, Tensor]:
        """Every layer's input mean and variance, laid end to end in layer order (``[C_1 +
        C_2 + ...]``): the fused layers' sums are reduced together (a handful of operations
        whatever the number of layers)."""
        stats = self._recorded()
        if not stats:
            return torch.zeros(0), torch.zeros(0)
        fused = [s for s, is_fused in zip(stats, self.fused) if is_fused]
        if fused and len({s[0].shape[0] for s in fused}) == 1:
            counts = _counts(tuple((s[0].shape[1], s[2]) for s in fused), fused[0][0].device)
            mean, var = moments_from_sums(torch.cat([s[0] for s in fused], dim=1),
                                          torch.cat([s[1] for s in fused], dim=1), counts)
            if len(fused) == len(stats):
                return mean, var
            means = iter(mean.split([s[0].shape[1] for s in fused]))
            variances = iter(var.split([s[0].shape[1] for s in fused]))
            pairs = [(next(means), next(variances)) if is_fused else s
                     for s, is_fused in zip(stats, self.fused)]
        else:  # rows differ from layer to layer (or none fused): one by one
            pairs = [moments_from_sums(*s) if is_fused else s
                     for s, is_fused in zip(stats, self.fused)]
        return torch.cat([m for m, _ in pairs]), torch.cat([v for _, v in pairs])

    def collected(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer: its input's per-channel (mean, var)."""
        mean, var = self.moments()
        sizes = [layer_stats[0].shape[-1] for layer_stats in self._recorded()]
        return list(zip(mean.split(sizes), var.split(sizes)))


@functools.lru_cache(maxsize=64)
def _counts(layers: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """Elements per channel, for layers of (channels, elements per channel) side by side."""
    return torch.cat([torch.full((channels,), float(count)) for channels, count in layers]).to(
        device)


def _is_plain_batch_norm(module: nn.Module) -> bool:
    """torch's BatchNorm with running statistics, whose output is exactly the inference-mode
    affine map of its input."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            and module.running_mean is not None and module.running_var is not None)
