"""How x* is parameterised: the tensor Adam optimises, and how it becomes a clip in [0, 1].

The LEAPS objective (losses.py) is the same whatever the parameterisation; what changes is the
space the optimiser moves in, and so which of the many clips that satisfy the objective it
finds (DESIGN.md section 5: a separate, named choice, measured against the paper's setting).

    pixels     x* itself (the paper): x = clamp(p, 0, 1).
    spectrum   phase-only under a fixed 3D amplitude spectrum M measured on the stimuli (MACO,
               Fel et al. 2023, extended over time): x = clamp(irfft3(M * exp(i phi)) + m, 0, 1)
               with phi the optimised phase and m the stimuli's channel means. The clip keeps
               the stimuli's energy at every spatio-temporal frequency, so it cannot become
               the high-frequency noise a pixel optimisation writes.
    warp       one image (phase-only under the stimuli's 2D spectrum) moved by smooth per-frame
               displacement fields: the motion is explicit, the appearance shared by the frames.

A parameterisation is built once per inversion from the stimuli (their spectrum is a constant,
recomputed identically on resume); only the parameter tensor is optimised and saved. Without
stimuli (priming off), spectrum and warp take the amplitude of natural scenes instead: 1/f,
scaled to the model's own input mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from leaps.config import PARAMS, SPECTRUM_SOURCES
from leaps.errors import LeapsError

_DIMS = (-3, -2, -1)  # T, H, W of [B, 3, T, H, W]


class Parameterisation:
    """The optimised tensor of ``[B, 3, T, H, W]`` clips and how it renders.

    ``init(generators)`` -> the initial parameter (CPU), row i drawn from ``generators[i]``;
    ``render(param)`` -> clips in [0, 1]
    (differentiable, on the parameter's device); ``project_(param)`` keeps the parameter in its
    domain after an optimiser step (in place, no host sync).
    """

    name: str

    def init(self, generators: Sequence[torch.Generator]) -> Tensor:
        return torch.cat([self.init_one(g) for g in generators])

    def init_one(self, generator: torch.Generator) -> Tensor:
        """One clip's initial parameter ``[1, ...]``."""
        raise NotImplementedError

    def encode(self, clips: Tensor) -> Tensor:
        """A parameter whose render is close to ``clips`` (``[B, 3, T, H, W]`` in [0, 1]): the
        start of feature accentuation (``--init stimulus``)."""
        raise NotImplementedError

    def render(self, param: Tensor) -> Tensor:
        raise NotImplementedError

    def project_(self, param: Tensor) -> None:
        """Nothing to do by default."""

    def to(self, device: torch.device) -> Parameterisation:
        """The same parameterisation with its constants on ``device``."""
        return self


@dataclass
class Pixels(Parameterisation):
    """x* itself, clamped to [0, 1] after each step (the paper)."""

    shape: tuple[int, ...]  # [B, 3, T, H, W]
    name: str = "pixels"

    def init_one(self, generator: torch.Generator) -> Tensor:
        return torch.rand((1, *self.shape[1:]), generator=generator)

    def render(self, param: Tensor) -> Tensor:
        return param

    def encode(self, clips: Tensor) -> Tensor:
        return clips.float().clone()

    @torch.no_grad()
    def project_(self, param: Tensor) -> None:
        param.clamp_(0, 1)


class _Polar(torch.autograd.Function):
    """``torch.polar(magnitude, phase)`` for a constant magnitude, differentiable in the phase.

    z = M e^{i phi}; a real loss's gradient g = dL/dRe z + i dL/dIm z gives
    dL/dphi = Re z * Im g - Im z * Re g = Im(conj(z) g): one complex product on the saved z.
    torch.polar's own forward and backward cost 2-3x as much on CPU (values agree to float
    rounding).
    """

    @staticmethod
    def forward(ctx: Any, magnitude: Tensor, phase: Tensor) -> Tensor:
        z = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (z,) = ctx.saved_tensors
        return None, (z.conj() * grad).imag


class Spectrum(Parameterisation):
    """Phase-only optimisation under the stimuli's 3D amplitude spectrum.

    ``magnitude``: ``[B, 3, T, H, W//2+1]`` (one per synthesized clip: the mean amplitude of
    all the run's stimuli, or of the target class's own), ``mean``: ``[B, 3, 1, 1, 1]``. FFTs
    run in float32 (also under autocast).
    """

    name = "spectrum"

    def __init__(self, magnitude: Tensor, mean: Tensor, size: tuple[int, int, int]) -> None:
        self.magnitude = magnitude
        self.mean = mean
        self.size = size

    def to(self, device: torch.device) -> Spectrum:
        return Spectrum(self.magnitude.to(device), self.mean.to(device), self.size)

    def init_one(self, generator: torch.Generator) -> Tensor:
        return (torch.rand((1, *self.magnitude.shape[1:]), generator=generator) * 2 - 1) \
            * torch.pi

    def encode(self, clips: Tensor) -> Tensor:
        """The clips' own phase (their structure) under this magnitude."""
        centred = clips.float() - self.mean.to(clips.device)
        return torch.fft.rfftn(centred, dim=_DIMS, norm="ortho").angle()

    def render(self, param: Tensor) -> Tensor:
        with torch.autocast(param.device.type, enabled=False):
            spectrum = _Polar.apply(self.magnitude, param.float())
            clip = torch.fft.irfftn(spectrum, s=self.size, dim=_DIMS, norm="ortho")
            return clip.add_(self.mean).clamp(0, 1)  # irfftn's backward does not read clip


class Warp(Parameterisation):
    """One image per clip, moved by smooth per-frame warps (motion made explicit: Li & Li 2025,
    "Feature Visualization in 3D CNNs", separate appearance from motion).

    The image is phase-only under the stimuli's 2D amplitude spectrum (over their frames);
    frame t is the image resampled at ``identity + flow_t``, where ``flow_t`` is a ``grid x
    grid`` field of displacements in pixels, upsampled bicubically to the frame (so the motion
    is smooth in space). The parameter is one flat row per clip: the image phase, then the
    flows ``[T, 2, grid, grid]`` (zero at the start: a still image that the objective sets in
    motion).
    """

    name = "warp"

    def __init__(self, magnitude: Tensor, mean: Tensor, frames: int, size: int,
                 grid: int) -> None:
        self.magnitude = magnitude  # [B, 3, H, W//2+1]
        self.mean = mean            # [B, 3, 1, 1]
        self.frames, self.size, self.grid = frames, size, grid
        self.image_numel = magnitude[0].numel()
        axis = (torch.arange(size, dtype=torch.float32, device=magnitude.device) * 2 + 1) / size - 1
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        self.identity = torch.stack([x, y], dim=-1)  # grid_sample's (x, y) in [-1, 1]

    def to(self, device: torch.device) -> Warp:
        return Warp(self.magnitude.to(device), self.mean.to(device), self.frames, self.size,
                    self.grid)

    def init_one(self, generator: torch.Generator) -> Tensor:
        phase = (torch.rand((1, self.image_numel), generator=generator) * 2 - 1) * torch.pi
        flow = torch.zeros(1, self.frames * 2 * self.grid ** 2)
        return torch.cat([phase, flow], dim=1)

    def encode(self, clips: Tensor) -> Tensor:
        """The phase of each clip's first frame, still (zero flows)."""
        first = clips[:, :, 0].float() - self.mean.to(clips.device)
        phase = torch.fft.rfftn(first, dim=(-2, -1), norm="ortho").angle().flatten(1)
        flow = torch.zeros(clips.shape[0], self.frames * 2 * self.grid ** 2,
                           device=clips.device)
        return torch.cat([phase, flow], dim=1)

    def render(self, param: Tensor) -> Tensor:
        batch, frames, size, grid = param.shape[0], self.frames, self.size, self.grid
        with torch.autocast(param.device.type, enabled=False):
            param = param.float()
            phase = param[:, :self.image_numel].reshape(self.magnitude.shape)
            image = torch.fft.irfftn(_Polar.apply(self.magnitude, phase), s=(size, size),
                                     dim=(-2, -1), norm="ortho") + self.mean
            flow = param[:, self.image_numel:].reshape(batch * frames, 2, grid, grid)
            dense = F.interpolate(flow, size=(size, size), mode="bicubic", align_corners=True)
            where = self.identity + dense.permute(0, 2, 3, 1) * (2 / size)
            moved = F.grid_sample(image.repeat_interleave(frames, dim=0), where,
                                  mode="bilinear", padding_mode="reflection",
                                  align_corners=False)
            clip = moved.reshape(batch, frames, 3, size, size).transpose(1, 2)
            return clip.clamp(0, 1)


def amplitude_spectrum(clips: Tensor) -> tuple[Tensor, Tensor]:
    """3D amplitude spectrum ``[3, T, H, W//2+1]`` and channel means ``[3, 1, 1, 1]`` of
    ``[N, 3, T, H, W]`` clips (means removed before the transform, orthonormal FFT).

    The amplitude is the root of the clips' mean power at each frequency, so a clip under it
    carries the clips' mean energy (a mean of amplitudes falls short of it wherever the clips
    differ, and gave clips smoother than real ones: frame difference and TV 0.64-0.66x)."""
    clips = clips.float()
    mean = clips.mean(dim=(0, *_DIMS))[:, None, None, None]
    power = torch.fft.rfftn(clips - mean, dim=_DIMS, norm="ortho").abs().square()
    return power.mean(dim=0).sqrt(), mean


def natural_spectrum(size: Sequence[int], mean: Sequence[float],
                     std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The amplitude of natural scenes, for clips of ``size`` (T, H, W, or H, W) when there are
    no stimuli to measure it on: 1/|f| over the frequencies in cycles per sample (the power law
    of natural images, Field 1987; here over space and time alike), zero at DC, scaled so that a
    clip under it has standard deviation ``std`` around ``mean`` in each channel (the model's
    input normalisation: what its training clips looked like). Returns the magnitude
    ``[3, *size[:-1], size[-1]//2+1]`` and the means ``[3, 1, ...]``."""
    axes = [torch.fft.fftfreq(n) for n in size[:-1]] + [torch.fft.rfftfreq(size[-1])]
    grids = torch.meshgrid(*axes, indexing="ij")
    radius = torch.sqrt(sum(g.square() for g in grids))
    inverse = torch.where(radius > 0, 1 / radius.clamp_min(1e-12), torch.zeros(()))
    # Energy of the full spectrum: the half-spectrum's inner planes stand for two frequencies.
    weight = torch.full((size[-1] // 2 + 1,), 2.0)
    weight[0] = 1.0
    if size[-1] % 2 == 0:
        weight[-1] = 1.0
    energy = float((inverse.square() * weight).sum())
    numel = math.prod(size)
    scale = torch.tensor([float(s) for s in std]) * math.sqrt(numel / energy)
    shape = (3,) + (1,) * len(size)
    magnitude = scale.reshape(shape) * inverse
    return magnitude, torch.tensor([float(m) for m in mean]).reshape(shape)


def check_stimuli(param: str, init: str, stimuli: Sequence[Tensor]) -> None:
    """Refuse what needs stimuli when there are none: ``--init stimulus``."""
    if stimuli:
        return
    if init == "stimulus":
        raise LeapsError("--init stimulus starts each clip from a stimulus of its class, and "
                         "there are none; give stimuli, or use --init noise")


def build(name: str, shape: Sequence[int], stimuli: Sequence[Tensor], samples: int,
          source: str = "all", grid: int = 4, pool: Sequence[Tensor] | None = None,
          normalisation: tuple[Sequence[float], Sequence[float]] = ((0.45,) * 3, (0.225,) * 3)
          ) -> Parameterisation:
    """The parameterisation ``name`` of ``shape`` = ``[B, 3, T, H, W]`` clips, B = targets x
    ``samples`` (target-major, as the inverter orders them). ``stimuli[i]``: the
    ``[N_i, 3, T, H, W]`` stimuli of target i in [0, 1]; ``source`` picks the spectrum's
    stimuli: ``all`` of ``pool`` (default: all of ``stimuli``), or each target ``class``'s
    own. Without stimuli the spectrum is :func:`natural_spectrum` at ``normalisation`` (the
    model's input mean and std on [0, 1] pixels; by default Kinetics')."""
    shape = tuple(int(s) for s in shape)
    pool = list(stimuli) if pool is None else list(pool)
    if name == "pixels":
        return Pixels(shape)
    if name == "spectrum":
        if source not in SPECTRUM_SOURCES:
            raise LeapsError(f"spectrum source must be one of {', '.join(SPECTRUM_SOURCES)}, "
                             f"got {source!r}")
        if not stimuli:
            magnitude, mean = natural_spectrum(shape[2:], *normalisation)
            return Spectrum(magnitude.expand(shape[0], *magnitude.shape).contiguous(),
                            mean.expand(shape[0], *mean.shape).contiguous(), shape[2:])
        if source == "all":
            magnitude, mean = amplitude_spectrum(torch.cat([s.cpu() for s in pool]))
            magnitudes = magnitude.expand(shape[0], *magnitude.shape)
            means = mean.expand(shape[0], *mean.shape)
        else:
            per_class = [amplitude_spectrum(s.cpu()) for s in stimuli]
            magnitudes = torch.stack([m for m, _ in per_class]).repeat_interleave(samples, 0)
            means = torch.stack([m for _, m in per_class]).repeat_interleave(samples, 0)
        return Spectrum(magnitudes.contiguous(), means.contiguous(), shape[2:])
    if name == "warp":
        if pool:
            frames = torch.cat([s.cpu() for s in pool]).float().transpose(1, 2).flatten(0, 1)
            mean = frames.mean(dim=(0, 2, 3))[:, None, None]
            power = torch.fft.rfftn(frames - mean, dim=(-2, -1), norm="ortho").abs().square()
            magnitude = power.mean(dim=0).sqrt()
        else:
            magnitude, mean = natural_spectrum(shape[3:], *normalisation)
        return Warp(magnitude.expand(shape[0], *magnitude.shape).contiguous(),
                    mean.expand(shape[0], *mean.shape).contiguous(), shape[2], shape[3],
                    grid)
    raise LeapsError(f"unknown parameterisation {name!r}; use one of {', '.join(PARAMS)}")
