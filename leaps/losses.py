"""The LEAPS objective, one term per function (DESIGN.md section 5).

    L(x*, V, y) = L_CE(x*, y) + L_prim(x*, V) + r * (R_coh(x*) + R_feat(x*))

x* is the synthesized clip, V the stimulus clip(s) of the target class y. Every function takes
and returns tensors only (no host synchronisation), so the optimisation loop stays on device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    """Half-precision activations (autocast) are reduced in float32; others keep their dtype."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """L_CE = -log softmax(logits)[y], averaged over the batch.

    Computed on the model's LOGITS (the official code applied CE to softmax outputs, which
    flattens the gradient once the class is likely).
    """
    return F.cross_entropy(_wide(logits), target)


def embedding_mean(features: Tensor) -> Tensor:
    """mu(z) = mean of ``[B, C, T, H, W]`` features over T, H, W -> ``[B, C]``."""
    return _wide(features).mean(dim=(2, 3, 4))


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


def priming_loss(embeddings: Sequence[Tensor], stimulus: Sequence[Tensor],
                 weights: Tensor) -> Tensor:
    """L_prim = (1/L) sum_l lambda_l (1 - JVS(mu(z_l(x*)), mu(z_l(V)))), averaged over the batch.

    ``embeddings[l]`` is mu(z_l(x*)) ``[B, C_l]``; ``stimulus[l]`` the stimulus embedding
    ``[B or 1, C_l]`` (the mean over several stimuli for multi-stimulus priming); ``weights`` the
    lambda_l of the primed taps. Taps not primed are simply left out of both lists; L counts the
    primed taps.
    """
    if len(embeddings) != len(stimulus) or len(embeddings) != len(weights):
        raise ValueError("priming needs one stimulus embedding and one weight per tap")
    terms = [w * (1 - jvs(z, v)) for z, v, w in zip(embeddings, stimulus, weights)]
    return torch.stack(terms).mean(dim=0).mean()


def frame_vectors(features: Tensor) -> Tensor:
    """f_t = mean of ``[B, C, T, H, W]`` features over H, W -> ``[B, C, T]``."""
    return _wide(features).mean(dim=(3, 4))


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


def channel_stats(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of a norm layer's input over all other axes."""
    dim = channel_dim % x.dim()
    var, mean = torch.var_mean(_wide(x), dim=[d for d in range(x.dim()) if d != dim],
                               unbiased=False)
    return mean, var


def feature_stats_loss(stats: Sequence[tuple[Tensor, Tensor]],
                       targets: Sequence[tuple[Tensor, Tensor]], weights: Tensor) -> Tensor:
    """R_feat = sum_l w_l (||mu_l(x*) - mu_l||_2 + ||var_l(x*) - var_l||_2) (DeepInversion).

    ``stats[l]`` are the batch mean/variance of the verifier's l-th norm-layer input for x*,
    ``targets[l]`` the running (or estimated) statistics; ``weights`` w_l, the first larger.
    """
    terms = [w * (torch.linalg.vector_norm(m - tm) + torch.linalg.vector_norm(v - tv))
             for (m, v), (tm, tv), w in zip(stats, targets, weights)]
    return torch.stack(terms).sum()


def feature_stats_weights(num_layers: int, first: float) -> Tensor:
    """w_l: ``first`` for the first norm layer, 1 for the others."""
    weights = torch.ones(num_layers)
    if num_layers:
        weights[0] = first
    return weights
