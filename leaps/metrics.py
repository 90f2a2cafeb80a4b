"""Measures of synthesized clips: what a classifier says, what the motion shows, how natural and
how diverse they look. Pure functions on tensors; videos are ``[N, 3, T, H, W]`` in [0, 1].

Top-1 by the inverted model saturates quickly (an optimiser that reads the model's logits
reaches them), so besides classifier agreement this module measures things the optimisation
could not game directly: a non-neural motion oracle for the synthetic motion dataset,
frame-to-frame change and spatial roughness relative to real clips, and diversity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from leaps.datasets import MOTION_CLASSES

# -- classifier agreement ---------------------------------------------------------------


def top1_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of clips whose highest logit is the target class: ``mean(argmax z_i == y_i)``."""
    if len(logits) == 0:
        raise ValueError("top-1 accuracy of zero clips is undefined")
    return float((logits.argmax(dim=1) == targets.to(logits.device)).float().mean())


def target_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of each clip's target class: ``softmax(z_i)[y_i]``, shape ``[N]``."""
    probs = logits.float().softmax(dim=1)
    return probs.gather(1, targets.to(probs.device).long()[:, None]).squeeze(1)


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int


def inception_score(logits: Tensor, splits: int = 10) -> InceptionScore:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over ``splits`` chunks.

    ``p(y)`` is the mean prediction of the chunk. It lies in [1, K]: 1 when every clip gets the
    same prediction (or a uniform one), K when each of K classes is predicted with certainty
    equally often. The number of splits is reduced until each chunk holds at least K clips
    (and is at least 1): a chunk of fewer than K clips cannot reach K, so the score would
    measure the chunk size rather than the synthesized clips.
    """
    n, classes = logits.shape
    if n == 0:
        raise ValueError("the Inception Score of zero clips is undefined")
    splits = max(1, min(splits, n // classes))
    log_p = logits.double().log_softmax(dim=1)
    scores = []
    for chunk in log_p.chunk(splits):
        log_marginal = chunk.exp().mean(dim=0).clamp_min(1e-300).log()
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    spread = float(torch.tensor(scores).std(unbiased=False)) if len(scores) > 1 else 0.0
    return InceptionScore(float(sum(scores) / len(scores)), spread, len(scores))


def opposite_indices(labels: Sequence[str], opposites: Sequence[tuple[str, str]]
                     ) -> dict[int, int]:
    """Class index -> index of its time-reversed opposite, for the pairs present in ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    pairs: dict[int, int] = {}
    for a, b in opposites:
        if a in index and b in index:
            pairs[index[a]] = index[b]
            pairs[index[b]] = index[a]
    return pairs


def reverse_in_time(videos: Tensor) -> Tensor:
    """``[N, 3, T, H, W]`` with the frame order reversed."""
    return videos.flip(2)


def motion_test(reversed_logits: Tensor, targets: Tensor, opposite: dict[int, int]
                ) -> tuple[float | None, int]:
    """Share of clips whose time-reversed version is classified as the target's opposite.

    ``reversed_logits`` are a classifier's logits for the clips reversed in time
    (:func:`reverse_in_time`); only clips whose target has an opposite count. Returns
    ``(accuracy, clips counted)``; the accuracy is None when no target has an opposite.
    """
    keep = [i for i, y in enumerate(targets.tolist()) if y in opposite]
    if not keep:
        return None, 0
    expected = torch.tensor([opposite[int(targets[i])] for i in keep])
    predicted = reversed_logits[keep].argmax(dim=1).cpu()
    return float((predicted == expected).float().mean()), len(keep)


# -- the motion oracle --------------------------------------------------------------------
# What the generator of leaps.datasets guarantees and the oracle relies on: the object is
# drawn in a saturated colour (every channel >= 0.925 or <= 0.075 before noise), the
# background is a smooth texture inside [0.25, 0.75], and Gaussian noise of std 0.06 is added
# to both. So "every channel far from mid-grey" separates object from background pixel by
# pixel (measured on real clips: 99% of object pixels are >= 0.29 from 0.5 in their closest
# channel, 99.9% of background pixels < 0.24).
SALIENCY_LOW, SALIENCY_HIGH = 0.20, 0.30
SUPPORT = 0.3  # mean weight of the 3x3 neighbourhood a pixel needs to count
# Elongation (0 round .. 1 a line) from which the principal axis is trusted fully; the
# dataset's shapes measure 0.5-0.8, a round blob's axis is noise.
ELONGATED = 0.3
# The generator's full-clip motion, to which each piece of evidence is normalised (1.0 = the
# motion a real clip of that class shows): translations travel 0.4 of the frame, rotations turn
# a quarter turn, grow/shrink scale the side by 1.26 / 0.7 (the area by its square).
TRAVEL = 0.4
TURN = math.pi / 2
LOG_AREA_CHANGE = 2 * math.log(1.26 / 0.7)


@dataclass(frozen=True)
class OracleConfig:
    """When the oracle commits to a class.

    It abstains when the object covers less than ``min_area`` or more than ``max_area`` of the
    frame on average (no distinct object), when the strongest normalised evidence is below
    ``min_evidence`` (the clip barely shows motion), or when it is less than ``margin`` times the
    evidence of the runner-up motion (the clip shows two motions about equally).
    """

    min_area: float = 0.003
    max_area: float = 0.35
    min_evidence: float = 0.35
    margin: float = 1.5


@dataclass(frozen=True)
class OracleVerdict:
    """What the oracle saw in one clip; ``label`` is None when it abstained, ``reason`` says
    why."""

    label: str | None
    reason: str
    evidence: dict[str, float]  # signed, normalised: x, y, rotation, scale
    area: float                 # mean object area, fraction of the frame


def object_saliency(video: Tensor) -> Tensor:
    """Per-pixel object weight in [0, 1] for one clip ``[3, T, H, W]`` -> ``[T, H, W]``.

    ``d = min_c |x_c - 0.5|`` ramped linearly from 0 at ``SALIENCY_LOW`` to 1 at
    ``SALIENCY_HIGH`` (see the generator facts above), kept where the mean weight of the 3x3
    neighbourhood is at least ``SUPPORT``.
    """
    distance = (video.float() - 0.5).abs().amin(dim=0)
    weight = ((distance - SALIENCY_LOW) / (SALIENCY_HIGH - SALIENCY_LOW)).clamp(0, 1)
    # Keep only pixels with salient neighbours: a lone noisy background pixel far from the
    # object would otherwise dominate the second moments (they grow with distance squared).
    support = F.avg_pool2d(weight[:, None], 3, stride=1, padding=1, count_include_pad=False)
    return weight * (support[:, 0] >= SUPPORT)


def _slope(values: Tensor) -> float:
    """Least-squares slope of ``values`` over t in [0, 1] (the fitted change over the clip)."""
    t = torch.linspace(0, 1, len(values), dtype=torch.float64)
    t = t - t.mean()
    return float((t * (values.double() - values.double().mean())).sum() / (t * t).sum())


def motion_evidence(video: Tensor) -> tuple[dict[str, float], float]:
    """Signed motion evidence of one clip ``[3, T, H, W]``, each normalised so that a real clip
    of the dataset shows about +-1, and the mean object area (fraction of the frame).

    With weights ``w`` = :func:`object_saliency` per frame: ``x``/``y`` = fitted change of the
    weighted centroid over the clip / (0.4 x frame side) (image y points down, so ``y > 0`` is
    "down"); ``rotation`` = median frame-to-frame change of the principal-axis angle
    ``0.5 atan2(2 mu_xy, mu_xx - mu_yy)`` times the number of steps (each step unwrapped modulo
    pi and weighted by ``min(1, elongation / ELONGATED)`` of the less elongated of its two
    frames) / (pi / 2), > 0 being clockwise on screen; ``scale`` = fitted change of
    log(mass) / log(area change). A single frame shows no motion: all evidence is 0.
    """
    weights = object_saliency(video)  # [T, H, W]
    frames, height, width = weights.shape
    if frames < 2:
        return {"x": 0.0, "y": 0.0, "rotation": 0.0, "scale": 0.0}, float(weights.mean())
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    w = weights.double()
    mass = w.sum(dim=(1, 2)).clamp_min(1e-6)
    cx = (w * xs).sum(dim=(1, 2)) / mass
    cy = (w * ys).sum(dim=(1, 2)) / mass
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mxx = (w * dx * dx).sum(dim=(1, 2)) / mass
    myy = (w * dy * dy).sum(dim=(1, 2)) / mass
    mxy = (w * dx * dy).sum(dim=(1, 2)) / mass
    angle = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    # 0 for a round blob (its axis is noise), 1 for a line
    elongation = torch.sqrt((mxx - myy) ** 2 + 4 * mxy ** 2) / (mxx + myy).clamp_min(1e-9)
    step = torch.remainder(angle[1:] - angle[:-1] + math.pi / 2, math.pi) - math.pi / 2
    reliable = (torch.minimum(elongation[1:], elongation[:-1]) / ELONGATED).clamp(max=1)
    # the median step, not the sum: one frame whose axis flips (a noisy, nearly round
    # silhouette) would otherwise add up to a quarter turn of the wrong sign
    turn = float((step * reliable).median()) * (frames - 1)
    side = float(max(height, width))
    evidence = {
        "x": _slope(cx) / (TRAVEL * side),
        "y": _slope(cy) / (TRAVEL * side),
        "rotation": turn / TURN,
        "scale": _slope(mass.log()) / LOG_AREA_CHANGE,
    }
    return evidence, float(w.mean())


# Which sign of which evidence each class of the dataset shows.
_CLASS_EVIDENCE = {
    "left": ("x", -1.0), "right": ("x", 1.0), "up": ("y", -1.0), "down": ("y", 1.0),
    "clockwise": ("rotation", 1.0), "counterclockwise": ("rotation", -1.0),
    "grow": ("scale", 1.0), "shrink": ("scale", -1.0),
}


def motion_oracle(video: Tensor, classes: Sequence[str] = MOTION_CLASSES,
                  config: OracleConfig = OracleConfig()) -> OracleVerdict:
    """Which motion class of the synthetic dataset one clip ``[3, T, H, W]`` shows, or abstain.

    Non-neural: it tracks the saturated object (:func:`motion_evidence`) and picks, among
    ``classes`` (names of :data:`leaps.datasets.MOTION_CLASSES`), the one whose motion has the
    largest evidence with the right sign. It abstains as :class:`OracleConfig` says.
    """
    unknown = [c for c in classes if c not in _CLASS_EVIDENCE]
    if unknown:
        raise ValueError(f"the motion oracle knows only {', '.join(MOTION_CLASSES)}, not "
                         f"{', '.join(unknown)}")
    evidence, area = motion_evidence(video)
    if area < config.min_area:
        return OracleVerdict(None, "no object", evidence, area)
    if area > config.max_area:
        return OracleVerdict(None, "no distinct object", evidence, area)
    scores = sorted(((sign * evidence[kind], name) for name, (kind, sign) in
                     _CLASS_EVIDENCE.items() if name in classes), reverse=True)
    best, label = scores[0]
    if best < config.min_evidence:
        return OracleVerdict(None, "weak motion", evidence, area)
    # The runner-up is the strongest OTHER kind of motion (the opposite of the best class has
    # negative evidence by construction, so it never competes).
    kind = _CLASS_EVIDENCE[label][0]
    rivals = [abs(evidence[k]) for k in evidence if k != kind and
              any(_CLASS_EVIDENCE[c][0] == k for c in classes)]
    if rivals and best < config.margin * max(rivals):
        return OracleVerdict(None, "ambiguous motion", evidence, area)
    return OracleVerdict(label, "decided", evidence, area)


@dataclass(frozen=True)
class OracleSummary:
    accuracy: float          # correct / all clips (an abstention is not a confirmation)
    abstention: float        # abstained / all clips
    decided_accuracy: float | None  # correct / decided clips
    clips: int


def oracle_summary(verdicts: Sequence[OracleVerdict], targets: Sequence[str]) -> OracleSummary:
    """Accuracy and abstention rate of oracle verdicts against the target class names."""
    if len(verdicts) != len(targets) or not verdicts:
        raise ValueError("need one target per verdict, and at least one")
    decided = [(v.label, t) for v, t in zip(verdicts, targets) if v.label is not None]
    correct = sum(label == target for label, target in decided)
    return OracleSummary(correct / len(verdicts), 1 - len(decided) / len(verdicts),
                         correct / len(decided) if decided else None, len(verdicts))


def oracle_on_real_clips(count_per_class: int, frames: int = 8, size: int = 32, seed: int = 1,
                         config: OracleConfig = OracleConfig()) -> OracleSummary:
    """The oracle's accuracy and abstention on real clips of :func:`leaps.datasets.make_dataset`
    (its validation; measured on 1600 clips at 8x32x32 for seeds 1-3: accuracy 99.3-99.8%,
    abstention 0.3-0.6%, 99.9-100% of its decisions right; 98.5-100% accuracy at 4-16 frames
    and 32-112 px)."""
    from leaps.datasets import make_dataset

    videos, labels, _ = make_dataset(count_per_class, frames, size, seed)
    return oracle_summary([motion_oracle(v, config=config) for v in videos],
                          [MOTION_CLASSES[i] for i in labels])


# -- naturalness --------------------------------------------------------------------------


def frame_difference(videos: Tensor) -> Tensor:
    """Mean absolute frame-to-frame difference per clip: ``mean |x_{t+1} - x_t|``, ``[N]``.

    0 for a static clip; a clip of a single frame has no motion and also scores 0."""
    if videos.shape[2] < 2:
        return videos.new_zeros(len(videos))
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().float().mean(dim=(1, 2, 3, 4))


def total_variation(videos: Tensor) -> Tensor:
    """Spatial total variation per clip: ``mean |dx| + mean |dy|`` of each frame, ``[N]``.

    Means over pixels (not sums), so clips of different sizes compare."""
    x = videos.float()
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4))
    return horizontal + vertical


def relative_to_reference(values: Tensor, classes: Sequence[str],
                          reference: dict[str, float]) -> list[float | None]:
    """Each clip's value divided by the mean value of real clips of its class (1.0 = as real);
    None where ``reference`` has no entry for the class."""
    return [float(v) / reference[c] if reference.get(c) else None
            for v, c in zip(values.tolist(), classes)]


def per_class_mean(values: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` for each class name in ``classes`` (one name per value)."""
    sums: dict[str, list[float]] = {}
    for value, name in zip(values.tolist(), classes):
        sums.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sums.items()}


# -- diversity ----------------------------------------------------------------------------


def pairwise_correlation(videos: Tensor) -> float | None:
    """Mean Pearson correlation over all pairs of clips (flattened pixels); None for < 2 clips.

    1 for identical clips, about 0 for independent noise; lower = more diverse. A constant clip
    has no defined correlation and counts as 0 with every other clip."""
    if len(videos) < 2:
        return None
    flat = videos.reshape(len(videos), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    norms = flat.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, flat / norms.clamp_min(1e-12), torch.zeros_like(flat))
    corr = unit @ unit.T
    n = len(videos)
    return float((corr.sum() - corr.diagonal().sum()) / (n * (n - 1)))


def diversity(videos: Tensor, classes: Sequence[str]) -> tuple[float | None, int]:
    """Mean over classes of :func:`pairwise_correlation` between the clips of that class.

    Returns ``(mean correlation, classes with at least two clips)``; None when no class has
    two clips (one sample per class says nothing about diversity)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(classes):
        groups.setdefault(name, []).append(i)
    values = [pairwise_correlation(videos[idx]) for idx in groups.values() if len(idx) > 1]
    values = [v for v in values if v is not None]
    return (sum(values) / len(values) if values else None), len(values)


def resize_clips(videos: Tensor, frames: int, size: int) -> Tensor:
    """Trilinear resize of ``[N, 3, T, H, W]`` (what another model's input size needs)."""
    if videos.shape[2:] == (frames, size, size):
        return videos
    return F.interpolate(videos.float(), size=(frames, size, size), mode="trilinear",
                         align_corners=False)


def as_dict(value: object) -> dict:
    """A metrics dataclass as a plain JSON-serialisable dict."""
    return asdict(value)  # type: ignore[call-overload]
