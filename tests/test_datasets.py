"""The synthetic motion dataset: deterministic, masked, and really temporal."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from leaps.datasets import MOTION_CLASSES, OPPOSITES, make_clip, make_dataset
from leaps.video import read_clip


def test_clips_are_deterministic_from_seed_and_index():
    a, b = make_clip("grow", seed=3, index=5), make_clip("grow", seed=3, index=5)
    assert torch.equal(a.video, b.video) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.video, make_clip("grow", seed=3, index=6).video)
    assert not torch.equal(a.video, make_clip("grow", seed=4, index=5).video)


def test_masks_cover_the_object_that_moves():
    clip = make_clip("right", frames=8, size=32, seed=0)
    assert clip.video.shape == (3, 8, 32, 32) and clip.mask.shape == (8, 32, 32)
    assert 0 <= clip.video.min() and clip.video.max() <= 1
    area = clip.mask.flatten(1).sum(1)
    assert (area > 10).all()
    xs = torch.arange(32.0)
    centre_x = [(clip.mask[t].float().sum(0) * xs).sum() / area[t] for t in range(8)]
    assert all(later > earlier for earlier, later in zip(centre_x, centre_x[1:]))
    grow = make_clip("grow", seed=1).mask.flatten(1).sum(1)
    assert grow[-1] > 2 * grow[0]


def _classifier(in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, len(MOTION_CLASSES)))


def _pair_accuracy(view, steps: int = 400) -> dict[tuple[str, str], float]:
    """Train a 2D CNN on ``view(videos) -> [N, K, C, H, W]`` (K images per clip, each with the
    clip's label; a clip's decision is its images' mean logits) and return, on held-out clips,
    the accuracy within each opposite pair (chance: 0.5)."""
    torch.manual_seed(0)
    videos, labels, _ = make_dataset(48, seed=11)
    images = view(videos)
    per_clip = images.shape[1]
    inputs, targets = images.flatten(0, 1), labels.repeat_interleave(per_clip)
    model = _classifier(images.shape[2])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(inputs), (64,))
        loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test, test_labels, _ = make_dataset(32, seed=12)
    test_images = view(test)
    with torch.no_grad():
        logits = model(test_images.flatten(0, 1)).unflatten(0, test_images.shape[:2]).mean(1)
    accuracy = {}
    for a, b in OPPOSITES:
        ia, ib = MOTION_CLASSES.index(a), MOTION_CLASSES.index(b)
        chosen = torch.where(logits[:, ia] >= logits[:, ib], ia, ib)
        members = (test_labels == ia) | (test_labels == ib)
        accuracy[(a, b)] = float((chosen[members] == test_labels[members]).float().mean())
    return accuracy


def test_a_per_frame_classifier_cannot_tell_opposite_motions_apart():
    """A 2D CNN on single frames (each labelled with its clip's class, TSN-style averaging)
    stays at chance within every opposite pair on held-out clips; the same network with the
    same training budget, given all frames stacked as channels, separates every pair - so
    the classes are told apart by the order of frames and by nothing a frame shows."""
    per_frame = _pair_accuracy(lambda v: v.permute(0, 2, 1, 3, 4))
    # 64 held-out clips per pair: chance is 0.5 with a standard error of ~0.06
    assert all(0.3 <= acc <= 0.7 for acc in per_frame.values()), per_frame
    all_frames = _pair_accuracy(lambda v: v.flatten(1, 2)[:, None])
    # measured: 1.0, 1.0, 0.75-0.78, 0.98 on 1 and 2 threads (rotation is the hardest). With
    # 200 steps grow/shrink was 0.66-0.94 depending on the thread count (float summation
    # order), so both networks get 400.
    assert all(acc >= 0.7 for acc in all_frames.values()), all_frames
    assert sum(all_frames.values()) / len(all_frames) >= 0.85, all_frames


def test_writes_a_clip_as_a_real_video(tmp_path):
    out = tmp_path / "left.mp4"
    done = subprocess.run([sys.executable, "-m", "leaps.datasets", "--write", str(out),
                           "--label", "left", "--frames", "8", "--size", "32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    clip = read_clip(out, 8, 32)
    original = make_clip("left", 8, 32, 0).video
    assert clip.shape == original.shape
    assert float((clip - original).abs().mean()) < 0.05


@pytest.mark.parametrize("label", ["up", 3])
def test_labels_by_name_or_index(label):
    assert make_clip(label).label == MOTION_CLASSES.index("down" if label == 3 else "up")
