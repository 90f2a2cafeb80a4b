"""Faithfulness of attribution maps: deletion / insertion curves and the pointing game.

* Deletion (Petsiuk et al. 2018, RISE): remove the voxels a map ranks highest first (replace
  them by a baseline) and follow the target probability; a faithful map makes it fall fast, so
  a LOWER area under the curve is better.
* Insertion: start from the baseline (a blurred clip) and put the highest-ranked voxels back
  first; a HIGHER area is better.
* Pointing game (Zhang et al. 2016): in each frame, is the map's maximum inside the object
  (or within a tolerance of it)?

Voxels are ranked over the whole clip (``T x H x W``), not frame by frame, so a map is also
judged on WHEN it puts its mass. Ties are broken at random (seeded), so a flat region of a map
is not read as "top-left first".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leaps.attribution import Target, baseline_video, resolve_targets


@dataclass
class Curve:
    """A deletion or insertion curve: ``scores[b, i]`` is clip b's target probability with a
    fraction ``fractions[i]`` of its voxels deleted (inserted); ``auc[b]`` its trapezoidal area
    over fractions in [0, 1]."""

    fractions: Tensor  # [S + 1]
    scores: Tensor     # [B, S + 1]
    auc: Tensor        # [B]


def rank_voxels(saliency: Tensor, seed: int = 0) -> Tensor:
    """Voxel indices of each clip ``[B, T, H, W]``, most salient first, ties in random order."""
    flat = saliency.detach().reshape(saliency.shape[0], -1).float()
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(flat.shape[1], generator=generator).to(flat.device)
    order = torch.argsort(flat[:, shuffle], dim=1, descending=True, stable=True)
    return shuffle[order]


def _curve(model: nn.Module, inputs: Tensor, saliency: Tensor, target: Target, steps: int,
           baseline: float | str | Tensor, insertion: bool, batch_size: int, seed: int
           ) -> Curve:
    if saliency.dim() == 5:
        saliency = saliency.squeeze(1) if saliency.shape[1] == 1 else saliency.abs().sum(1)
    b, _, t, h, w = inputs.shape
    if saliency.shape != (b, t, h, w):
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match clips "
                         f"{tuple(inputs.shape)}; give [B, T, H, W] at the clips' size")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inputs = inputs.detach()
    targets = resolve_targets(model, inputs, target)
    reference = baseline_video(inputs, baseline).detach()
    order = rank_voxels(saliency.to(inputs.device), seed)
    volume = t * h * w
    fractions = torch.linspace(0, 1, steps + 1)
    counts = (fractions * volume).round().long().tolist()
    # rank[b, v] = position of voxel v in clip b's order; voxel v is changed once count > rank
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(volume, device=order.device).expand(b, -1))
    scores = torch.empty(b, steps + 1)
    jobs = [(i, j) for i in range(steps + 1) for j in range(b)]
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            changed = torch.stack([(rank[j] < counts[i]).view(1, t, h, w) for i, j in chunk])
            source = torch.stack([inputs[j] for _, j in chunk])
            other = torch.stack([reference[j] for _, j in chunk])
            if insertion:
                clips = torch.where(changed, source, other)
            else:
                clips = torch.where(changed, other, source)
            probs = F.softmax(model(clips).float(), dim=1)
            picked = probs.gather(1, targets[[j for _, j in chunk]][:, None])[:, 0].cpu()
            for (i, j), p in zip(chunk, picked):
                scores[j, i] = p
    auc = torch.trapezoid(scores, fractions, dim=1)
    return Curve(fractions, scores, auc)


def deletion_curve(model: nn.Module, inputs: Tensor, saliency: Tensor, target: Target = None,
                   *, steps: int = 32, baseline: float | str | Tensor = "blur",
                   batch_size: int = 16, seed: int = 0) -> Curve:
    """Deletion curve of ``saliency`` (``[B, T, H, W]``, or a method's raw map) on ``inputs``
    ``[B, 3, T, H, W]``: the target probability as the top-ranked voxels are replaced by
    ``baseline`` in ``steps`` equal steps. Lower AUC = more faithful. ``target`` None: each
    clip's predicted class.

    The default baseline is the blurred clip, not black (RISE's choice for images): a moving
    object painted black is still a moving object, and on the motion dataset black deletion
    of the exact object mask scored WORSE than deleting random voxels (AUC 0.37 vs 0.34),
    while blur deletion separates them (0.34 vs 0.71). Pass ``baseline=0.0`` for RISE's."""
    return _curve(model, inputs, saliency, target, steps, baseline, False, batch_size, seed)


def insertion_curve(model: nn.Module, inputs: Tensor, saliency: Tensor, target: Target = None,
                    *, steps: int = 32, baseline: float | str | Tensor = "blur",
                    batch_size: int = 16, seed: int = 0) -> Curve:
    """Insertion curve: start from ``baseline`` (default: each frame blurred) and restore the
    top-ranked voxels of the clip first. Higher AUC = more faithful."""
    return _curve(model, inputs, saliency, target, steps, baseline, True, batch_size, seed)


def pointing_game(saliency: Tensor, masks: Tensor, tolerance: float = 0, seed: int = 0
                  ) -> Tensor:
    """Per-frame hits ``[B, T]`` (bool): the map's maximum lies inside the object mask or, with
    ``tolerance > 0``, closer than ``tolerance`` pixels (Euclidean) to one of its pixels.

    ``saliency`` is ``[B, T, H, W]`` (or ``[B, 1, T, H, W]``), ``masks`` bool ``[B, T, H, W]``,
    on the same pixel grid. This is the pointing game of Zhang et al. (ECCV 2016) as TorchRay's
    reference implementation scores it (``torchray.benchmark.pointing_game``: a hit when the
    mask meets the disc of distance < tolerance around the maximum; 15 px on the original
    image there), with two rules for maps that are not natural images:

    * a frame whose map is constant points nowhere: a miss;
    * several pixels sharing the maximum (a saturated or clipped map, the plateau a coarse
      map leaves at the frame border after upsampling) are a tie, broken at random (seeded),
      not in raster order, which would always pick the plateau's top-left pixel.

    Give the raw map (or :func:`~leaps.attribution.heatmap` with ``percentile=100``), not a
    display heat map clipped at a percentile: clipping makes the top voxels tie.

    Frames without the object (an empty mask) are scored too (a miss); :func:`hit_rate`
    leaves them out, as the pointing game does (it asks only about objects present).
    """
    if saliency.dim() == 5:
        saliency = saliency[:, 0]
    if saliency.shape != masks.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and masks {tuple(masks.shape)} "
                         "differ in shape")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    b, t, h, w = saliency.shape
    flat = saliency.detach().reshape(b, t, -1).float()
    top = flat.max(dim=2, keepdim=True).values
    generator = torch.Generator().manual_seed(seed)
    lottery = torch.rand(flat.shape, generator=generator).to(flat.device)
    peak = torch.where(flat == top, lottery, torch.full_like(lottery, -1.0)).argmax(dim=2)
    region = masks.to(torch.bool).to(flat.device)
    if tolerance > 0:
        radius = math.ceil(tolerance) - 1 if float(tolerance).is_integer() else \
            math.floor(tolerance)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2) < float(tolerance) ** 2
        region = F.conv2d(region.float().reshape(b * t, 1, h, w),
                          disc.float()[None, None].to(flat.device),
                          padding=radius).reshape(b, t, h, w) > 0
    hits = region.reshape(b, t, -1).gather(2, peak[..., None])[..., 0]
    flat_frames = top[..., 0] == flat.min(dim=2).values
    return hits & ~flat_frames


def hit_rate(saliency: Tensor, masks: Tensor, tolerance: float = 0, seed: int = 0) -> float:
    """Fraction of the frames that show the object (non-empty mask) where
    :func:`pointing_game` hits; frames without the object are left out."""
    hits = pointing_game(saliency, masks, tolerance, seed)
    shown = masks.reshape(*masks.shape[:2], -1).any(dim=2).to(hits.device)
    return float(hits[shown].float().mean()) if shown.any() else float("nan")
