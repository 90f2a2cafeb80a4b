"""A synthetic motion dataset where only MOTION reveals the class.

An object (random shape, colour, size, start position) moves on a textured, noisy background:
left / right / up / down, rotates clockwise / counter-clockwise, grows / shrinks. Start states
are drawn so that every single frame has the same distribution in both classes of an opposite
pair - a per-frame classifier cannot tell them apart; only the order of frames can. Clips are
deterministic from (seed, index) and come with per-frame object masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MOTION_CLASSES = ("left", "right", "up", "down", "clockwise", "counterclockwise", "grow",
                  "shrink")
# A horizontal flip turns these into each other; a reversal in time turns OPPOSITES around.
MIRRORS = (("left", "right"), ("clockwise", "counterclockwise"))
OPPOSITES = (("left", "right"), ("up", "down"), ("clockwise", "counterclockwise"),
             ("grow", "shrink"))
SHAPES = ("bar", "ellipse", "triangle")


@dataclass(frozen=True)
class MotionClip:
    video: Tensor  # [3, T, H, W] in [0, 1]
    mask: Tensor   # [T, H, W] bool, the object's pixels
    label: int


def _background(size: int, generator: torch.Generator) -> Tensor:
    """Smooth random colour texture: coarse noise upsampled, plus a tint."""
    coarse = torch.rand(3, 6, 6, generator=generator)
    texture = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bicubic",
                                              align_corners=False)[0]
    return (0.25 + 0.5 * texture).clamp(0, 1)


def _inside(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Object membership in its own frame (u along its long axis), unit half-length."""
    if shape == "bar":
        return (u.abs() <= 1) & (v.abs() <= 0.35)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 <= 1
    # an isosceles triangle pointing along +u: orientation is visible
    return (u >= -1) & (u <= 1) & (v.abs() <= 0.55 * (1 - u) / 2)


def make_clip(label: str | int, frames: int = 8, size: int = 32, seed: int = 0,
              index: int = 0) -> MotionClip:
    """One clip of ``label``, reproducible from ``(seed, index)``."""
    cls = MOTION_CLASSES.index(label) if isinstance(label, str) else int(label)
    name = MOTION_CLASSES[cls]
    g = torch.Generator().manual_seed(seed * 1_000_003 + index * 7919 + cls)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=g))]
    half = uniform(0.14, 0.22) * size          # half-length of the object
    colour = torch.rand(3, generator=g)
    colour = torch.where(colour > 0.5, 0.85 + 0.15 * colour, 0.15 * colour)  # saturated
    angle0 = uniform(0, 2 * math.pi)
    cx0, cy0 = uniform(0.35, 0.65) * size, uniform(0.35, 0.65) * size
    t = torch.linspace(0, 1, frames)
    if name in ("left", "right", "up", "down"):
        # the start is drawn so that both directions of a pair share every frame's marginal
        travel = 0.4 * size
        sign = -1.0 if name in ("left", "up") else 1.0
        lo, hi = 0.25 * size, 0.75 * size - travel
        begin = uniform(lo, hi) if sign > 0 else uniform(lo + travel, hi + travel)
        pos = begin + sign * travel * t
        cx = pos if name in ("left", "right") else torch.full_like(t, cx0)
        cy = pos if name in ("up", "down") else torch.full_like(t, cy0)
        angle, scale = torch.full_like(t, angle0), torch.ones_like(t)
    elif name in ("clockwise", "counterclockwise"):
        # image y points down: clockwise on screen is increasing angle
        sign = 1.0 if name == "clockwise" else -1.0
        cx, cy = torch.full_like(t, cx0), torch.full_like(t, cy0)
        angle = angle0 + sign * (math.pi / 2) * t
        scale = torch.ones_like(t)
    else:
        small, large = 0.7, 1.26
        scale = small * (large / small) ** (t if name == "grow" else 1 - t)
        cx, cy = torch.full_like(t, cx0), torch.full_like(t, cy0)
        angle = torch.full_like(t, angle0)

    background = _background(size, g)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    video = torch.empty(3, frames, size, size)
    mask = torch.empty(frames, size, size, dtype=torch.bool)
    noise = 0.06 * torch.randn(3, frames, size, size, generator=g)
    for f in range(frames):
        dx, dy = xs - cx[f], ys - cy[f]
        c, s = math.cos(float(angle[f])), math.sin(float(angle[f]))
        length = half * float(scale[f])
        u = (c * dx + s * dy) / length
        v = (-s * dx + c * dy) / length
        inside = _inside(shape, u, v)
        mask[f] = inside
        video[:, f] = torch.where(inside, colour[:, None, None], background)
    video = (video + noise).clamp(0, 1)
    return MotionClip(video, mask, cls)


def make_dataset(count_per_class: int, frames: int = 8, size: int = 32, seed: int = 0,
                 classes: tuple[str, ...] = MOTION_CLASSES) -> tuple[Tensor, Tensor, Tensor]:
    """``count_per_class`` clips of each class: videos [N,3,T,H,W], labels [N], masks [N,T,H,W].

    Labels index ``classes``."""
    clips = [make_clip(name, frames, size, seed, i) for i in range(count_per_class)
             for name in classes]
    videos = torch.stack([c.video for c in clips])
    labels = torch.tensor([classes.index(MOTION_CLASSES[c.label]) for c in clips])
    masks = torch.stack([c.mask for c in clips])
    return videos, labels, masks


def main(argv: list[str] | None = None) -> None:
    """``python -m leaps.datasets --write clip.mp4 --label right``: write one clip as a video."""
    import argparse

    from leaps.video import write_mp4

    parser = argparse.ArgumentParser(description="Write a synthetic motion clip as a video.")
    parser.add_argument("--write", required=True, help="output .mp4 path")
    parser.add_argument("--label", choices=MOTION_CLASSES, default="right")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clip = make_clip(args.label, args.frames, args.size, args.seed)
    print(write_mp4(clip.video, args.write))


if __name__ == "__main__":
    main()
