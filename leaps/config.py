"""Every option of an inversion, as data (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from leaps.errors import LeapsError

FLIP_MODES = ("auto", "on", "off", "swap")
PARAMS = ("pixels", "spectrum", "warp")          # x*'s parameterisations (leaps/params.py)
SPECTRUM_SOURCES = ("all", "class")      # whose amplitude spectrum --param spectrum keeps
INITS = ("noise", "stimulus")            # where x* starts


# Presets: named settings that differ from the dataclass defaults ("default" is those).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The paper's objective and augmentation exactly (DESIGN.md section 5): pixel space, one
    # view per step with a random roll and a (direction-aware) flip, Adam at 0.1, 2000 steps.
    "paper": {"param": "pixels", "iterations": 2000, "lr": 0.1, "views": 1, "crop": 1.0,
              "noise": 0.0, "time_shift": 0, "verifier_ce_weight": 0.0, "init": "noise",
              "spectrum_source": "all"},
}


@dataclass(frozen=True)
class Range:
    """An interval a numeric option must lie in (``None``: unbounded on that side);
    ``integer`` options must also be whole numbers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def holds(self, value: float) -> bool:
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = (int(b) if self.integer else f"{b:g}" for b in (self.low, self.high or 0))
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return (f"{kind} in {'(' if self.low_open else '['}{low}, {high}"
                f"{')' if self.high_open else ']'}")


_WEIGHT = Range(0.0)
_FRACTION = Range(0.0, 1.0, high_open=True)
# What ``--resume`` may change: how long the run goes on, how often it logs and saves, and
# where it computes. Everything else would make it another run.
MAY_CHANGE_ON_RESUME = ("iterations", "log_every", "save_every", "device")
# The range of each numeric option (every numeric value must also be finite).
RANGES: dict[str, Range] = {
    "iterations": Range(1, integer=True), "lr": Range(0.0, low_open=True), "warmup": _FRACTION,
    "lambda_1": _WEIGHT, "lambda_L": _WEIGHT, "r": _WEIGHT, "ce_weight": _WEIGHT,
    "priming_weight": _WEIGHT, "coherence_weight": _WEIGHT, "feature_weight": _WEIGHT,
    "priming_fraction": Range(0.0, 1.0, low_open=True), "coherence_margin": _WEIGHT,
    "first_norm_weight": _WEIGHT, "jitter": _FRACTION, "jitter_end": _FRACTION,
    "samples": Range(1, integer=True), "batch_size": Range(1, integer=True),
    "seed": Range(0, 2**63 - 1, integer=True),
    "log_every": Range(1, integer=True), "save_every": Range(1, integer=True),
    "warp_grid": Range(2, 64, integer=True), "views": Range(1, 64, integer=True),
    "crop": Range(0.0, 1.0, low_open=True), "noise": _WEIGHT,
    "time_shift": Range(0, integer=True), "verifier_ce_weight": _WEIGHT,
}


@dataclass
class InvertConfig:
    """Every knob of an inversion. ``None`` hyperparameters come from the registry entry.

    Each field's ``help`` metadata is its documentation (the CLI shows it as the option help).
    """

    preset: str = field(default="default", metadata={
        "help": "Defaults to start from: default (the best measured setting, "
                "docs/ablation/transfer.md) or paper (the paper's objective exactly: pixels, "
                "one view, its roll and flip); the other options override it.",
        "choices": tuple(PRESETS)})
    # 300: where transfer to unseen families peaks under the spectrum parameterisation
    # (docs/ablation/transfer.md: longer runs fit the guiding models and transfer less).
    iterations: int = field(default=300, metadata={"help": "Optimisation steps."})
    lr: float = field(default=0.5, metadata={
        "help": "Adam learning rate of x*'s parameter (pixels: 0.1 as the paper; spectrum "
                "phases: 0.5)."})
    warmup: float = field(default=0.05, metadata={
        "help": "Fraction of the steps with a linear learning-rate warm-up (then cosine to 0)."})
    lambda_1: float | None = field(default=None, metadata={
        "help": "Priming weight of the first tap (default: the registry's Table S1 value)."})
    lambda_L: float | None = field(default=None, metadata={
        "help": "Priming weight of the last tap; linear in between (default: registry)."})
    r: float | None = field(default=None, metadata={
        "help": "Weight of the regularisers R_coh + R_feat (default: registry)."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of L_CE (ablations)."})
    priming_weight: float = field(default=1.0, metadata={"help": "Weight of L_prim (ablations)."})
    coherence_weight: float = field(default=1.0, metadata={
        "help": "Weight of R_coh inside r(...) (ablations)."})
    feature_weight: float = field(default=1.0, metadata={
        "help": "Weight of R_feat inside r(...) (ablations)."})
    priming_fraction: float = field(default=1.0, metadata={
        "help": "Prime the first ceil(fraction x L) taps (paper S4; 1 = all taps, as LEAPS)."})
    coherence_margin: float | None = field(default=None, metadata={
        "help": "delta of R_coh (default: measured on the stimuli, their mean distance between "
                "non-consecutive frames)."})
    first_norm_weight: float = field(default=10.0, metadata={
        "help": "R_feat weight of the verifier's first norm layer (the others weigh 1)."})
    jitter: float = field(default=0.125, metadata={
        "help": "Random spatial roll each step, up to this fraction of the crop size."})
    jitter_end: float | None = field(default=None, metadata={
        "help": "Roll jitter at the last step, linear from --jitter over the run (default: "
                "the same, a constant jitter as the paper; 0 lets the end refine the clip "
                "for the model itself, see docs/ablation)."})
    flip: str = field(default="auto", metadata={
        "help": "Horizontal flip each step: on, off, swap (flip and swap the target with its "
                "mirror class), auto (swap where the label set declares mirrors, else on)."})
    param: str = field(default="spectrum", metadata={
        "help": "How x* is parameterised: spectrum (phase-only under the stimuli's 3D amplitude "
                "spectrum), pixels (the paper) or warp (one image moved by smooth per-frame "
                "warps); see leaps/params.py.",
        "choices": PARAMS})
    spectrum_source: str = field(default="class", metadata={
        "help": "--param spectrum: the amplitude spectrum of all the run's stimuli, or of each "
                "target class's own.", "choices": SPECTRUM_SOURCES})
    warp_grid: int = field(default=4, metadata={
        "help": "--param warp: control points per side of each frame's displacement field."})
    init: str = field(default="noise", metadata={
        "help": "Where x* starts: noise (seeded per clip), or stimulus: one of its class's "
                "stimuli (picked by the clip's seed), which the objective then accentuates "
                "(feature accentuation, Hamblin et al. 2024).", "choices": INITS})
    views: int = field(default=1, metadata={
        "help": "Augmented views of x* per step (K), run as one batch; the loss is averaged "
                "over them."})
    # crop, noise, time shift: on by default, even at K = 1 (about 10 ms a step on X3D-XS): they
    # lifted demo.resnet3d's unseen-family top-1 from 76% to 84% (docs/ablation/transfer.md).
    crop: float = field(default=0.8, metadata={
        "help": "Random resized crop of each view: the smallest crop side, as a fraction of "
                "the frame (1 = no crop)."})
    noise: float = field(default=0.05, metadata={
        "help": "Standard deviation of Gaussian pixel noise added to each view."})
    time_shift: int = field(default=1, metadata={
        "help": "Shift each view in time by up to this many frames (edge frames repeated)."})
    verifier_ce_weight: float = field(default=1.0, metadata={
        "help": "Weight of the verifiers' cross-entropy for the target (verifiers with the "
                "model's label set; 0 = the paper, R_feat only)."})
    samples: int = field(default=1, metadata={"help": "Clips synthesized per target."})
    batch_size: int = field(default=8, metadata={
        "help": "Clips optimised together: the run's clips (targets x samples) are cut into "
                "batches of this many, each a unit of work with its own resumable state "
                "(shared out among the processes under torchrun)."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial noise and the jitter."})
    log_every: int = field(default=25, metadata={
        "help": "Steps between loss logs (the only host synchronisation in the loop)."})
    save_every: int = field(default=100, metadata={
        "help": "Steps between saves of the resumable state (also saved on Ctrl-C)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda:N."})
    channels_last: bool = field(default=False, metadata={"help": "Use channels_last_3d memory."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})

    @classmethod
    def from_preset(cls, preset: str = "default", **options: Any) -> InvertConfig:
        """The preset's settings, overridden by ``options``."""
        if preset not in PRESETS:
            raise LeapsError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **options, "preset": preset})

    def with_registry_defaults(self, lambda_1: float, lambda_L: float, r: float) -> InvertConfig:
        return replace(self,
                       lambda_1=lambda_1 if self.lambda_1 is None else self.lambda_1,
                       lambda_L=lambda_L if self.lambda_L is None else self.lambda_L,
                       r=r if self.r is None else self.r)

    def validate(self) -> None:
        """Every value finite and in its range (:data:`RANGES`); the message names the option
        as the CLI spells it. Called before anything is built or written."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (bool, str)):
                continue
            option = "--" + f.name.replace("_", "-")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LeapsError(f"{option} must be a finite number, got {value!r}")
            expected = RANGES.get(f.name)
            if expected is not None and not expected.holds(value):
                raise LeapsError(f"{option} must be {expected}, got {value!r}")
        if self.flip not in FLIP_MODES:
            raise LeapsError(f"--flip must be one of {', '.join(FLIP_MODES)}, got {self.flip!r}")
        if self.param not in PARAMS:
            raise LeapsError(f"--param must be one of {', '.join(PARAMS)}, got {self.param!r}")
        if self.spectrum_source not in SPECTRUM_SOURCES:
            raise LeapsError(f"--spectrum-source must be one of {', '.join(SPECTRUM_SOURCES)}, "
                             f"got {self.spectrum_source!r}")
        if self.init not in INITS:
            raise LeapsError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.preset not in PRESETS:
            raise LeapsError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")

    def resumed_with(self, changes: dict[str, Any], done: int
                     ) -> tuple[InvertConfig, list[str]]:
        """This (a saved run's) config with the option values given again on ``--resume``:
        those of :data:`MAY_CHANGE_ON_RESUME` are applied (with a note each, to tell the user),
        any other that differs is an error. ``done`` is the number of steps already run."""
        updates, notes = {}, []
        for name, value in changes.items():
            old = getattr(self, name)
            if value == old:
                continue
            option = "--" + name.replace("_", "-")
            if name not in MAY_CHANGE_ON_RESUME:
                raise LeapsError(
                    f"{option} {value} conflicts with the run being resumed ({option} {old}); "
                    f"--resume keeps the run's options except "
                    f"{', '.join('--' + n.replace('_', '-') for n in MAY_CHANGE_ON_RESUME)}: "
                    f"drop {option}, or start a new run with --out")
            updates[name] = value
            notes.append(f"resuming with {option} {value} (the run had {old})" + (
                "; the learning-rate schedule is fitted to the new length"
                if name == "iterations" else ""))
        config = replace(self, **updates)
        config.validate()
        if config.iterations < done:
            raise LeapsError(f"--iterations {config.iterations} is fewer than the {done} steps "
                             "the run has done; give at least that many")
        return config, notes

    def jitter_pixels(self, step: int, size: int) -> int:
        """The roll bound at ``step`` (0-based) on a ``size``-pixel crop: ``jitter`` at the first
        step, linear to ``jitter_end`` at the last."""
        end = self.jitter if self.jitter_end is None else self.jitter_end
        fraction = self.jitter + (end - self.jitter) * step / max(1, self.iterations - 1)
        return int(round(fraction * size))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InvertConfig:
        """A saved config (run.json). One saved before x* had parameterisations (no "param")
        was the paper's setting, so what it lacks comes from the paper preset."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        if "param" not in data:
            return cls(**{**PRESETS["paper"], **known, "preset": "paper"})
        return cls(**known)
