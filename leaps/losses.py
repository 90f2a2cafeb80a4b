"""The LEAPS objective, one term per function (DESIGN.md section 5).

    L(x*, V, y) = L_CE(x*, y) + L_prim(x*, V) + r * (R_coh(x*) + R_feat(x*))

x* is the synthesized clip, V the stimulus clip(s) of the target class y. Every function takes
and returns tensors only (no host synchronisation), so the optimisation loop stays on device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _wide(x: Tensor) -> Tensor:
    """Half-precision activations (autocast) are reduced in float32; others keep their dtype."""
    return x.float() if x.dtype in _WIDE else x


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """L_CE = -log softmax(logits)[y], averaged over the batch.

    Computed on the model's LOGITS (the official code applied CE to softmax outputs, which
    flattens the gradient once the class is likely).
    """
    return F.cross_entropy(_wide(logits), target)


class _Mean(torch.autograd.Function):
    """``x.mean(dims)`` whose gradient is a broadcast view, not a materialised tensor.

    Autograd's mean backward writes a full-size ``grad / N``, which is then added to the
    tensor's other gradient (taps are read from activations the network goes on using); here
    the broadcast ``grad / N`` goes straight into that sum: same values, one full-size pass
    fewer per tap.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        ctx.shape = x.shape
        ctx.dims = dims
        ctx.count = math.prod(x.shape[d] for d in dims)
        return x.mean(dim=dims)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        shape = list(ctx.shape)
        for d in ctx.dims:
            shape[d] = 1
        return (grad / ctx.count).reshape(shape).expand(ctx.shape), None


def embedding_mean(features: Tensor) -> Tensor:
    """mu(z) = mean of ``[B, C, T, H, W]`` features over T, H, W -> ``[B, C]``."""
    return _Mean.apply(_wide(features), (2, 3, 4))


def jvs(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Jaccard vector similarity per sample: JVS(a, b) = a.b / (|a|^2 + |b|^2 - a.b).

    ``a``, ``b``: ``[B, C]`` (``b`` may be ``[1, C]``). Returns ``[B]``; 1 for identical
    vectors, 0 for orthogonal ones.
    """
    dot = (a * b).sum(dim=-1)
    return dot / (a.pow(2).sum(dim=-1) + b.pow(2).sum(dim=-1) - dot + eps)


def priming_weights(num_taps: int, lambda_1: float, lambda_L: float) -> Tensor:
    """lambda_l, linear from lambda_1 (first tap) down to lambda_L (last tap)."""
    if num_taps == 1:
        return torch.tensor([lambda_1])
    return torch.linspace(lambda_1, lambda_L, num_taps)


def _segments(flat: Tensor, sizes: Sequence[int]) -> Tensor:
    """``[..., sum(sizes)]`` (per-layer vectors side by side) -> ``[..., len(sizes), max(sizes)]``,
    each vector in its own row, zero-padded: per-layer reductions become one reduction over the
    last axis (one kernel and one autograd node instead of a handful per layer)."""
    index, width = _segment_index(tuple(sizes), flat.device)
    padded = flat.new_zeros(*flat.shape[:-1], len(sizes) * width)
    return padded.index_copy(-1, index, flat).unflatten(-1, (len(sizes), width))


@functools.lru_cache(maxsize=64)
def _segment_index(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, int]:
    width = max(sizes)
    index = torch.cat([torch.arange(size) + row * width for row, size in enumerate(sizes)])
    return index.to(device), width


def priming_loss(embeddings: Sequence[Tensor], stimulus: Sequence[Tensor],
                 weights: Tensor) -> Tensor:
    """L_prim = (1/L) sum_l lambda_l (1 - JVS(mu(z_l(x*)), mu(z_l(V)))), averaged over the batch.

    ``embeddings[l]`` is mu(z_l(x*)) ``[B, C_l]``; ``stimulus[l]`` the stimulus embedding
    ``[B or 1, C_l]`` (the mean over several stimuli for multi-stimulus priming); ``weights`` the
    lambda_l of the primed taps. Taps not primed are simply left out of both lists; L counts the
    primed taps. All taps are reduced at once (zero-padded rows; see :func:`jvs` for one tap).
    """
    if len(embeddings) != len(stimulus) or len(embeddings) != len(weights):
        raise ValueError("priming needs one stimulus embedding and one weight per tap")
    sizes = [z.shape[-1] for z in embeddings]
    batch = torch.broadcast_shapes(*(v.shape[:-1] for v in stimulus))
    a = _segments(torch.cat(list(embeddings), dim=-1), sizes)                      # [B, L, C]
    b = _segments(torch.cat([v.expand(*batch, -1) for v in stimulus], dim=-1), sizes)
    dot = (a * b).sum(dim=-1)                                                        # [B, L]
    similarity = dot / (a.pow(2).sum(dim=-1) + b.pow(2).sum(dim=-1) - dot + 1e-8)
    return (weights * (1 - similarity)).mean(dim=-1).mean()


def frame_vectors(features: Tensor) -> Tensor:
    """f_t = mean of ``[B, C, T, H, W]`` features over H, W -> ``[B, C, T]``."""
    return _Mean.apply(_wide(features), (3, 4))


def coherence_loss(frames: Tensor, margin: float | Tensor) -> Tensor:
    """R_coh on per-frame vectors ``[B, C, T]`` of the last tap.

    Consecutive frames are pulled together, non-consecutive ones pushed apart to ``margin``:
        R_coh = mean_{t} d(f_t, f_t+1) + mean_{|t1-t2|>1} max(0, delta - d(f_t1, f_t2)),
    with d the mean absolute difference over channels (scale-free means, not sums). A clip of
    fewer than 3 feature frames has no non-consecutive pairs; one of 1 frame gives 0.
    """
    steps = frames.shape[-1]
    if steps < 2:
        return frames.new_zeros(())
    distance = (frames.unsqueeze(-1) - frames.unsqueeze(-2)).abs().mean(dim=1)  # [B, T, T]
    t1, t2 = torch.triu_indices(steps, steps, offset=1, device=frames.device)
    gap = t2 - t1
    pair = distance[:, t1, t2]
    pull = pair[:, gap == 1].mean()
    if steps < 3:
        return pull
    push = torch.clamp(margin - pair[:, gap > 1], min=0).mean()
    return pull + push


def coherence_margin(frames: Tensor) -> Tensor:
    """delta measured on real clips: their mean non-consecutive frame distance (``[N, C, T]``)."""
    steps = frames.shape[-1]
    if steps < 3:
        return frames.new_zeros(())
    distance = (frames.unsqueeze(-1) - frames.unsqueeze(-2)).abs().mean(dim=1)
    t1, t2 = torch.triu_indices(steps, steps, offset=2, device=frames.device)
    return distance[:, t1, t2].mean()


def _moments(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over every axis but ``dim`` (no autograd).

    The values are those of ``torch.var_mean(x, dims, unbiased=False)``; only the work differs:
    on CPU, where ``var_mean``'s Welford reduction over strided axes is several times slower than
    a forward+backward of the norm layer itself, a contiguous channels-on-axis-1 input is read
    as ``[B, C, L]`` rows: sums and sums of squares along the contiguous axis (3-7x faster than
    two passes), var = E[x^2] - mean^2 in fp32 accumulation (relative error ~1e-5 when
    mean^2 ~ 16 var; far below what the loss resolves). Other layouts take two passes (mean,
    then the mean square deviation); CUDA takes ``var_mean``.
    """
    x = _wide(x)
    if x.device.type == "cpu" and dim == 1 and x.dim() > 2 and x.is_contiguous():
        rows = x.view(x.shape[0], x.shape[1], -1)          # [B, C, L], L contiguous
        count = rows.shape[0] * rows.shape[2]
        mean = rows.sum(dim=2).sum(dim=0).div_(count)
        square = torch.linalg.vector_norm(rows, dim=2).square_().sum(dim=0).div_(count)
        return mean, square.sub_(mean.square()).clamp_min_(0.0)
    dims = [d for d in range(x.dim()) if d != dim]
    if x.device.type == "cpu":
        mean = x.mean(dim=dims, keepdim=True)
        return mean.flatten(), (x - mean).square_().mean(dim=dims)
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, var


def _moments_backward(x: Tensor, mean: Tensor, dim: int, grad_mean: Tensor | None,
                      grad_var: Tensor | None) -> Tensor:
    """d/dx of (g_mean . mean + g_var . var) = g_mean / N + (2 g_var / N) (x - mean).

    One per-channel affine map of x with the saved mean, instead of autograd's re-reduction,
    subtraction, product, expansion and sum (5 full-size passes). With channels on axis 1 it
    runs as an inference-mode ``batch_norm`` (running mean 0, variance 1, eps 0: exactly
    ``weight * x + bias``), whose per-channel kernel is 2-3x faster on CPU than the broadcast
    ``addcmul`` used for other layouts (tokens, channels last).
    """
    count = x.numel() // max(1, mean.numel())
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    scale = grad_var * (2.0 / count)
    shift = torch.addcmul(grad_mean * (1.0 / count), scale, mean, value=-1.0)
    if dim == 1 and x.dim() > 1:
        return torch.batch_norm(x, scale.to(x.dtype), shift.to(x.dtype),
                                torch.zeros_like(shift, dtype=x.dtype),
                                torch.ones_like(shift, dtype=x.dtype), False, 0.0, 0.0, False)
    view = [1] * x.dim()
    view[dim] = -1
    return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance (:func:`_moments`) with a one-pass backward
    (:func:`_moments_backward`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        mean, var = _moments(x, dim)
        ctx.save_for_backward(x, mean)
        ctx.dim = dim
        return mean, var

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor, None]:
        x, mean = ctx.saved_tensors
        return _moments_backward(x, mean, ctx.dim, grad_mean, grad_var), None


def channel_stats(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of a norm layer's input over all other axes."""
    return _ChannelMoments.apply(x, channel_dim % x.dim())


class _BatchNormSums(torch.autograd.Function):
    """Attaches the per-row sums of an inference-mode BatchNorm's input x and of its square
    (rows: one per sample and channel, ``[B, C]``) to its output
    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, with one backward for all.

    Forward: y passes through unchanged (no compute); the sums are two reductions along the
    contiguous axis (float32 for half-precision x). The per-channel mean and variance they
    stand for are formed later for all layers at once (:func:`moments_from_sums`), so a layer
    costs the two reductions and no small per-layer arithmetic.
    Backward: reading the sums with a function of their own would leave x with two gradients -
    the layer's ``g_y * s`` (s = weight / sqrt(running_var + eps)) and the sums'
    ``g_sum + 2 g_sq x`` - each written to a fresh full-size buffer and then summed. Here
        d/dx = g_y * s + 2 g_sq x + g_sum
    is written once: the per-row affine map as one inference-mode ``batch_norm`` over the
    ``B * C`` rows (running variance 1/4 doubles x), then ``g_y * s`` added in place. The
    layer's weight and bias get no gradient (a frozen model).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(y)  # y (a detached alias of the layer's output) is returned as itself,
        # not as a view, so the network may go on to modify it in place (ReLU(inplace=True))
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        wide = _WIDE.get(x.dtype, x.dtype)
        sums = rows.sum(dim=2, dtype=wide)
        squares = torch.linalg.vector_norm(rows, dim=2, dtype=wide).square_()
        ctx.save_for_backward(x, scale)
        return y, sums, squares

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_sums: Tensor | None,
                 grad_squares: Tensor | None) -> tuple[Tensor | None, None, None]:
        x, scale = ctx.saved_tensors
        if grad_sums is None and grad_squares is None:
            return (None if grad_y is None else grad_y * scale), None, None
        rows = x.shape[0] * x.shape[1]
        half = (torch.zeros(rows, dtype=x.dtype, device=x.device) if grad_squares is None
                else grad_squares.to(x.dtype).reshape(rows))
        offset = (torch.zeros(rows, dtype=x.dtype, device=x.device) if grad_sums is None
                  else grad_sums.to(x.dtype).reshape(rows))
        zero, quarter = _doubling_stats(rows, x.device, x.dtype)
        grad = torch.batch_norm(x.reshape(1, rows, -1), half, offset, zero, quarter, False, 0.0,
                                0.0, False).view(x.shape)
        if grad_y is not None:
            grad = grad.addcmul_(grad_y, scale)
        return grad, None, None


@functools.lru_cache(maxsize=256)
def _doubling_stats(rows: int, device: torch.device, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
    """Running mean 0 and variance 1/4 (eps 0): an inference-mode batch_norm that is
    ``weight * 2x + bias``, so the gradient of the squares needs no doubling of its own."""
    return (torch.zeros(rows, device=device, dtype=dtype),
            torch.full((rows,), 0.25, device=device, dtype=dtype))


def batch_norm_scale(weight: Tensor | None, running_var: Tensor, eps: float,
                     like: Tensor) -> Tensor:
    """s = weight / sqrt(running_var + eps) of an inference-mode BatchNorm, shaped to multiply
    its ``[B, C, ...]`` input ``like`` (and in its dtype)."""
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    return scale.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def batch_norm_sums(x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(y', sums, squares)``: the output ``y`` of an inference-mode BatchNorm on ``[B, C, ...]``
    input ``x`` (same values; its graph is replaced: the gradient reaches x directly) and the
    ``[B, C]`` sums of x and x^2 (float32 for half-precision x) over each sample's channel, with
    one fused backward (``_BatchNormSums``). ``scale``: :func:`batch_norm_scale` of the layer,
    whose weight must not need a gradient. :func:`moments_from_sums` turns the sums into mean
    and variance."""
    return _BatchNormSums.apply(x, y.detach(), scale)


def moments_from_sums(sums: Tensor, squares: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance from ``[R, C]`` row sums of x and x^2 (summed over
    the R rows) and the number of elements per channel (``counts``, ``[C]`` or a number):
    mean = sum / n, var = sum(x^2) / n - mean^2 (float32 accumulation: relative error ~1e-5
    where mean^2 ~ 16 var, far below what the loss resolves). Several layers' sums side by
    side (``[R, C_1 + C_2 + ...]``) give all their moments in one go."""
    mean = sums.sum(dim=0) / counts
    return mean, (squares.sum(dim=0) / counts - mean.square()).clamp_min(0.0)


def feature_stats_loss(stats: Sequence[tuple[Tensor, Tensor]],
                       targets: Sequence[tuple[Tensor, Tensor]], weights: Tensor) -> Tensor:
    """R_feat = sum_l w_l (||mu_l(x*) - mu_l||_2 + ||var_l(x*) - var_l||_2) (DeepInversion).

    ``stats[l]`` are the batch mean/variance of the verifier's l-th norm-layer input for x*,
    ``targets[l]`` the running (or estimated) statistics; ``weights`` w_l, the first larger.
    """
    if len(stats) != len(targets) or len(stats) != len(weights):
        raise ValueError("feature statistics need one target and one weight per layer")
    if not stats:
        return weights.new_zeros(())
    return feature_stats_distance(
        torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats]),
        torch.cat([m for m, _ in targets]), torch.cat([v for _, v in targets]),
        [m.shape[-1] for m, _ in stats], weights)


def feature_stats_distance(mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor,
                           sizes: Sequence[int], weights: Tensor) -> Tensor:
    """:func:`feature_stats_loss` on every layer's statistics laid end to end (``[C_1 + C_2 +
    ...]``, layer l has ``sizes[l]`` channels): all layers are reduced at once, one norm per
    zero-padded row (2 rows a layer)."""
    if len(sizes) != len(weights):
        raise ValueError("feature statistics need one target and one weight per layer")
    if not sizes:
        return weights.new_zeros(())
    difference = torch.cat([mean - target_mean, var - target_var])
    norms = torch.linalg.vector_norm(_segments(difference, list(sizes) * 2), dim=-1)  # [2L]
    return (weights * norms.view(2, -1).sum(dim=0)).sum()


def feature_stats_weights(num_layers: int, first: float) -> Tensor:
    """w_l: ``first`` for the first norm layer, 1 for the others."""
    weights = torch.ones(num_layers)
    if num_layers:
        weights[0] = first
    return weights
