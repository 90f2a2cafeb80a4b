"""Forward hooks that capture what the LEAPS terms read: tap embeddings and norm-layer stats.

Hooks reduce on the spot (mean embeddings, per-frame vectors, channel statistics), so nothing
beyond what autograd already keeps stays alive, and nothing leaves the device.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn

from leaps.adapter import NormLayer, Tap
from leaps.losses import batch_norm_with_stats, channel_stats, embedding_mean, frame_vectors


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

    A plain inference-mode BatchNorm (``torch.nn.BatchNorm*d``, not a subclass with a forward of
    its own, with running statistics and channels on axis 1) computes its output and the
    statistics in one function whose backward writes the input's gradient once
    (:func:`batch_norm_with_stats`): while any recorder is open on such a layer its ``forward``
    is swapped for one that serves every open recorder waiting for statistics (a recorder left
    unclosed and dropped stops counting). Any other norm layer (LayerNorm, subclasses, layers
    whose forward something else replaced) gets a forward pre-hook that reads its input; so
    does a BatchNorm in training mode or with a trainable affine, inside the swapped forward.
    """

    def __init__(self, layers: list[NormLayer]) -> None:
        super().__init__()
        self.layers = layers
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        self._fused: list[nn.Module] = []
        for i, layer in enumerate(layers):
            if _fusable(layer):
                _fused_forward(layer.module).append((weakref.ref(self), i))
                self._fused.append(layer.module)
            else:
                self._handles.append(layer.module.register_forward_pre_hook(self._hook(i, layer)))

    def close(self) -> None:
        super().close()
        for module in self._fused:
            readers = getattr(module, _READERS)
            readers[:] = [(ref, i) for ref, i in readers if ref() not in (self, None)]
            if not readers:
                del module.forward
                delattr(module, _READERS)
        self._fused.clear()

    def reset(self) -> None:
        self.stats = [None] * len(self.layers)

    def _hook(self, index: int, layer: NormLayer) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if self.stats[index] is None:
                self.stats[index] = channel_stats(inputs[0], layer.channel_dim)
        return hook

    def collected(self) -> list[tuple[Tensor, Tensor]]:
        missing = [layer.name for layer, s in zip(self.layers, self.stats) if s is None]
        if missing:
            raise RuntimeError(f"norm layers did not run in forward: {missing}")
        return self.stats  # type: ignore[return-value]


_READERS = "_leaps_norm_stats_readers"


def _fusable(layer: NormLayer) -> bool:
    module = layer.module
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            and ("forward" not in vars(module) or hasattr(module, _READERS))
            and module.running_mean is not None and module.running_var is not None
            and layer.channel_dim == 1)


def _fused_forward(module: nn.Module) -> list[tuple[weakref.ref[NormStatsRecorder], int]]:
    """Swap ``module.forward`` (once) for the fused BatchNorm; return its list of readers
    (recorder, layer index), to which the caller adds itself."""
    if hasattr(module, _READERS):
        return getattr(module, _READERS)
    readers: list[tuple[weakref.ref[NormStatsRecorder], int]] = []
    plain = module.forward

    def forward(x: Tensor) -> Tensor:
        waiting = [(recorder, i) for ref, i in readers
                   if (recorder := ref()) is not None and recorder.stats[i] is None]
        if not waiting:                # a second call in one forward, or no recorder waiting
            return plain(x)
        if module.training or (module.weight is not None and module.weight.requires_grad):
            stats = channel_stats(x, 1)              # batch statistics / affine gradients
            y = plain(x)
        else:
            y, *stats = batch_norm_with_stats(x, module.weight, module.bias,
                                              module.running_mean, module.running_var,
                                              module.eps)
        for recorder, i in waiting:
            recorder.stats[i] = tuple(stats)
        return y

    module.forward = forward  # type: ignore[method-assign]
    setattr(module, _READERS, readers)
    return readers
