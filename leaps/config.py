"""Every option of an inversion, as data (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from leaps.errors import LeapsError

FLIP_MODES = ("auto", "on", "off", "swap")


@dataclass
class InvertConfig:
    """Every knob of an inversion. ``None`` hyperparameters come from the registry entry.

    Each field's ``help`` metadata is its documentation (the CLI shows it as the option help).
    """

    iterations: int = field(default=2000, metadata={"help": "Optimisation steps."})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate (pixel space)."})
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
    samples: int = field(default=1, metadata={"help": "Clips synthesized per target."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial noise and the jitter."})
    log_every: int = field(default=25, metadata={
        "help": "Steps between loss logs (the only host synchronisation in the loop)."})
    save_every: int = field(default=100, metadata={
        "help": "Steps between saves of the resumable state (also saved on Ctrl-C)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda:N."})
    channels_last: bool = field(default=False, metadata={"help": "Use channels_last_3d memory."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})

    def with_registry_defaults(self, lambda_1: float, lambda_L: float, r: float) -> InvertConfig:
        return replace(self,
                       lambda_1=lambda_1 if self.lambda_1 is None else self.lambda_1,
                       lambda_L=lambda_L if self.lambda_L is None else self.lambda_L,
                       r=r if self.r is None else self.r)

    def validate(self) -> None:
        if self.iterations < 1:
            raise LeapsError(f"iterations must be >= 1, got {self.iterations}")
        if self.flip not in FLIP_MODES:
            raise LeapsError(f"flip must be one of {', '.join(FLIP_MODES)}, got {self.flip!r}")
        if not 0 < self.priming_fraction <= 1:
            raise LeapsError(f"priming fraction must be in (0, 1], got {self.priming_fraction}")
        if self.samples < 1:
            raise LeapsError(f"samples must be >= 1, got {self.samples}")
        for name in ("jitter", "jitter_end"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise LeapsError(f"{name.replace('_', ' ')} must be a fraction of the crop size "
                                 f"in [0, 1), got {value}")
        if not 0 <= self.warmup < 1:
            raise LeapsError(f"warmup must be a fraction in [0, 1), got {self.warmup}")

    def jitter_pixels(self, step: int, size: int) -> int:
        """The roll bound at ``step`` (0-based) on a ``size``-pixel crop: ``jitter`` at the first
        step, linear to ``jitter_end`` at the last."""
        end = self.jitter if self.jitter_end is None else self.jitter_end
        fraction = self.jitter + (end - self.jitter) * step / max(1, self.iterations - 1)
        return int(round(fraction * size))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InvertConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
