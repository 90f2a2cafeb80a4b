"""Forward hooks that capture what the LEAPS terms read: tap embeddings and norm-layer stats.

Hooks reduce on the spot (mean embeddings, per-frame vectors, channel statistics), so nothing
beyond what autograd already keeps stays alive, and nothing leaves the device.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from leaps.adapter import NormLayer, Tap
from leaps.losses import batch_norm_stats, channel_stats, embedding_mean, frame_vectors


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
    the layer's output re-attached through :func:`batch_norm_stats`, so that the input's
    gradient from the layer and from the statistics is written once. Everything else (LayerNorm,
    subclasses, a layer in training mode) keeps its output and gets :func:`channel_stats`.
    A module that runs twice in one forward is read the first time.
    """

    def __init__(self, layers: list[NormLayer]) -> None:
        super().__init__()
        self.layers = layers
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        for i, layer in enumerate(layers):
            self._handles.append(layer.module.register_forward_hook(self._hook(i, layer)))

    def reset(self) -> None:
        self.stats = [None] * len(self.layers)

    def _hook(self, index: int, layer: NormLayer) -> Any:
        fusable = layer.channel_dim == 1 and _is_plain_batch_norm(layer.module)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if self.stats[index] is not None:
                return None
            x = inputs[0]
            if fusable and not module.training and not any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                output, mean, var = batch_norm_stats(x, output, module.weight,
                                                     module.running_var, module.eps)
                self.stats[index] = (mean, var)
                return output
            self.stats[index] = channel_stats(x, layer.channel_dim)
            return None
        return hook

    def collected(self) -> list[tuple[Tensor, Tensor]]:
        missing = [layer.name for layer, s in zip(self.layers, self.stats) if s is None]
        if missing:
            raise RuntimeError(f"norm layers did not run in forward: {missing}")
        return self.stats  # type: ignore[return-value]


def _is_plain_batch_norm(module: nn.Module) -> bool:
    """torch's BatchNorm with running statistics, whose output is exactly the inference-mode
    affine map of its input."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            and module.running_mean is not None and module.running_var is not None)
