"""Each measure of leaps.metrics on constructed inputs with known answers, and the motion
oracle on real clips of the synthetic motion dataset."""

from __future__ import annotations

import math

import pytest
import torch

from leaps import metrics
from leaps.datasets import MOTION_CLASSES, OPPOSITES, make_clip, make_dataset

SIZE, FRAMES = 32, 8
COLOUR = torch.tensor([0.95, 0.05, 0.95])  # saturated, as the dataset's objects


def scene(masks: torch.Tensor, background: float = 0.5) -> torch.Tensor:
    """A clip [3, T, H, W]: a saturated object where ``masks`` [T, H, W] is true."""
    video = torch.full((3, *masks.shape), background)
    return torch.where(masks[None], COLOUR[:, None, None, None], video)


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")  # ys, xs


def moving_square(dx: float, dy: float, half: float = 4) -> torch.Tensor:
    ys, xs = grid()
    t = torch.linspace(0, 1, FRAMES)
    cx, cy = SIZE / 2 + dx * (t - 0.5), SIZE / 2 + dy * (t - 0.5)
    return scene(torch.stack([((xs - x).abs() <= half) & ((ys - y).abs() <= half)
                              for x, y in zip(cx, cy)]))


def rotating_bar(turn: float) -> torch.Tensor:
    """A bar about the centre whose angle (image coordinates: x right, y down) grows by ``turn``
    radians over the clip: > 0 turns clockwise on screen."""
    ys, xs = grid()
    masks = []
    for angle in (0.3 + turn * torch.linspace(0, 1, FRAMES)).tolist():
        u = math.cos(angle) * (xs - SIZE / 2) + math.sin(angle) * (ys - SIZE / 2)
        v = -math.sin(angle) * (xs - SIZE / 2) + math.cos(angle) * (ys - SIZE / 2)
        masks.append((u.abs() <= 9) & (v.abs() <= 2.5))
    return scene(torch.stack(masks))


def disc(r0: float, r1: float) -> torch.Tensor:
    ys, xs = grid()
    radii = torch.linspace(r0, r1, FRAMES).tolist()
    return scene(torch.stack([(xs - SIZE / 2) ** 2 + (ys - SIZE / 2) ** 2 <= r * r
                              for r in radii]))


CONSTRUCTED = {
    "right": lambda: moving_square(12, 0), "left": lambda: moving_square(-12, 0),
    "down": lambda: moving_square(0, 12), "up": lambda: moving_square(0, -12),
    "clockwise": lambda: rotating_bar(math.pi / 2),
    "counterclockwise": lambda: rotating_bar(-math.pi / 2),
    "grow": lambda: disc(4, 8), "shrink": lambda: disc(8, 4),
}


# -- the motion oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("label", MOTION_CLASSES)
def test_oracle_names_the_motion_of_a_constructed_clip(label):
    verdict = metrics.motion_oracle(CONSTRUCTED[label]())
    assert verdict.label == label, verdict


def test_a_clip_reversed_in_time_shows_the_opposite_motion():
    opposite = dict(OPPOSITES) | {b: a for a, b in OPPOSITES}
    for label in MOTION_CLASSES:
        clip = CONSTRUCTED[label]()
        assert metrics.motion_oracle(clip.flip(1)).label == opposite[label], label


def test_evidence_is_normalised_to_the_datasets_motion():
    """A square travelling 0.4 of the frame (the dataset's travel) measures x = +1."""
    evidence, area = metrics.motion_evidence(moving_square(0.4 * SIZE, 0))
    assert evidence["x"] == pytest.approx(1.0, abs=0.05)
    assert abs(evidence["y"]) < 0.02 and abs(evidence["scale"]) < 0.05
    assert area == pytest.approx(64 / SIZE ** 2, rel=0.1)  # an 8x8 square


@pytest.mark.parametrize("clip, reason", [
    (moving_square(0, 0), "weak motion"),                     # static object
    (torch.full((3, FRAMES, SIZE, SIZE), 0.5), "no object"),  # nothing but background
    (torch.randint(0, 2, (1, FRAMES, SIZE, SIZE)).float().expand(3, -1, -1, -1),
     "no distinct object"),                                   # black/white noise everywhere
    (moving_square(12, 12), "ambiguous motion"),              # diagonal: right and down
])
def test_oracle_abstains_without_clear_evidence(clip, reason):
    verdict = metrics.motion_oracle(clip)
    assert verdict.label is None and verdict.reason == reason, verdict


def test_a_single_frame_shows_no_motion():
    verdict = metrics.motion_oracle(moving_square(12, 0)[:, :1])
    assert verdict.label is None and verdict.reason == "weak motion"


def test_oracle_chooses_only_among_the_given_classes():
    clip = moving_square(12, 0)
    assert metrics.motion_oracle(clip, classes=("left", "right")).label == "right"
    assert metrics.motion_oracle(clip, classes=("up", "down")).label is None
    with pytest.raises(ValueError, match="sideways"):
        metrics.motion_oracle(clip, classes=("left", "sideways"))


@pytest.mark.parametrize("frames, size", [(8, 32), (4, 32), (16, 64)])
def test_oracle_is_right_on_real_clips_of_the_dataset(frames, size):
    summary = metrics.oracle_on_real_clips(10, frames, size, seed=3)
    assert summary.clips == 80
    assert summary.accuracy >= 0.95, summary
    assert summary.decided_accuracy >= 0.98, summary  # it abstains rather than err


def test_oracle_summary_counts_abstentions_as_unconfirmed():
    right = metrics.motion_oracle(moving_square(12, 0))
    static = metrics.motion_oracle(moving_square(0, 0))
    summary = metrics.oracle_summary([right, static, right, right], ["right", "right", "left",
                                                                    "right"])
    assert (summary.accuracy, summary.abstention, summary.decided_accuracy) == \
        (0.5, 0.25, pytest.approx(2 / 3))


# -- classifier agreement ---------------------------------------------------------------------


def test_top1_and_target_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2])
    assert metrics.top1_accuracy(logits, targets) == pytest.approx(1 / 3)
    probs = metrics.target_probability(logits, targets)
    assert probs[0] == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    assert probs[1] == pytest.approx(1 / (2 + math.exp(3)))
    assert probs[2] == pytest.approx(1 / 3)


def test_inception_score_of_uniform_and_of_confident_distinct_predictions():
    classes = 5
    uniform = metrics.inception_score(torch.zeros(20, classes))
    assert uniform.mean == pytest.approx(1.0) and uniform.std == pytest.approx(0.0)
    confident = 50.0 * torch.eye(classes).repeat(4, 1)  # 20 clips, each class 4 times
    score = metrics.inception_score(confident, splits=10)
    assert score.splits == 4  # every split keeps >= K clips
    assert score.mean == pytest.approx(classes, rel=1e-6)
    same = metrics.inception_score(50.0 * torch.eye(classes)[[2] * 10])
    assert same.mean == pytest.approx(1.0)


def test_inception_score_between_one_and_the_class_count():
    torch.manual_seed(0)
    score = metrics.inception_score(3 * torch.randn(40, 4), splits=2)
    assert 1 < score.mean < 4 and score.splits == 2 and score.std > 0


def test_motion_test_counts_reversed_clips_classified_as_the_opposite():
    labels = ("left", "right", "up", "down", "grow")
    opposite = metrics.opposite_indices(labels, OPPOSITES)
    assert opposite == {0: 1, 1: 0, 2: 3, 3: 2}  # shrink is not a class here
    targets = torch.tensor([0, 1, 2, 4])
    reversed_logits = torch.eye(5)[[1, 1, 3, 4]]  # right ok, left wrong, down ok, grow n/a
    accuracy, counted = metrics.motion_test(reversed_logits, targets, opposite)
    assert counted == 3 and accuracy == pytest.approx(2 / 3)
    assert metrics.motion_test(reversed_logits[3:], targets[3:], opposite) == (None, 0)
    assert torch.equal(metrics.reverse_in_time(moving_square(12, 0)[None])[0],
                       moving_square(-12, 0))


# -- naturalness and diversity --------------------------------------------------------------


def test_frame_difference_of_static_and_flickering_clips():
    static = torch.rand(1, 3, 1, SIZE, SIZE).expand(2, 3, FRAMES, SIZE, SIZE)
    assert torch.equal(metrics.frame_difference(static), torch.zeros(2))
    flicker = (torch.arange(FRAMES) % 2).float().view(1, 1, FRAMES, 1, 1).expand(1, 3, FRAMES, 4, 4)
    assert metrics.frame_difference(flicker).item() == pytest.approx(1.0)
    assert metrics.frame_difference(flicker[:, :, :1]).item() == 0.0


def test_total_variation_of_flat_and_striped_frames():
    flat = torch.full((1, 3, 2, 8, 8), 0.3)
    assert metrics.total_variation(flat).item() == 0.0
    stripes = (torch.arange(8) % 2).float().view(1, 1, 1, 1, 8).expand(1, 3, 2, 8, 8)
    assert metrics.total_variation(stripes).item() == pytest.approx(1.0)  # |dx| = 1, |dy| = 0
    assert metrics.total_variation(stripes.transpose(-1, -2)).item() == pytest.approx(1.0)


def test_real_clips_are_as_real_as_themselves():
    videos, labels, _ = make_dataset(3, seed=1)
    names = [MOTION_CLASSES[i] for i in labels]
    diff = metrics.frame_difference(videos)
    reference = metrics.per_class_mean(diff, names)
    relative = metrics.relative_to_reference(diff, names, reference)
    for name in MOTION_CLASSES:
        mine = [r for r, n in zip(relative, names) if n == name]
        assert sum(mine) / len(mine) == pytest.approx(1.0)
    doubled = metrics.relative_to_reference(2 * diff, names, reference)
    assert sum(doubled) / len(doubled) == pytest.approx(2.0)
    assert metrics.relative_to_reference(diff[:1], ["unknown"], reference) == [None]


def test_correlation_of_identical_inverted_and_independent_clips():
    clip = make_clip("right").video
    assert metrics.pairwise_correlation(torch.stack([clip, clip])) == pytest.approx(1.0)
    assert metrics.pairwise_correlation(torch.stack([clip, 1 - clip])) == pytest.approx(-1.0)
    torch.manual_seed(0)
    assert abs(metrics.pairwise_correlation(torch.rand(4, 3, FRAMES, SIZE, SIZE))) < 0.02
    assert metrics.pairwise_correlation(clip[None]) is None


def test_diversity_averages_within_classes_only():
    a, b = make_clip("left").video, make_clip("up").video
    torch.manual_seed(1)
    noise = torch.rand_like(a)
    videos = torch.stack([a, a, b, noise])
    value, groups = metrics.diversity(videos, ["left", "left", "up", "up"])
    assert groups == 2
    expected = (1.0 + metrics.pairwise_correlation(torch.stack([b, noise]))) / 2
    assert value == pytest.approx(expected)
    assert metrics.diversity(videos[:2], ["left", "up"]) == (None, 0)
