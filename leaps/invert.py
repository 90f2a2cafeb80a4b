"""The LEAPS optimisation loop: architecture-agnostic and GPU-first.

One forward+backward of the model (and one of the verifier, unless the verifier is the model
itself, when a single shared pass serves both) per iteration; stimulus features are computed
once; nothing leaves the device inside the loop except every ``log_every`` steps.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from leaps import losses, params
from leaps.adapter import VideoClassifier
from leaps.config import FLIP_MODES, InvertConfig  # noqa: F401  (re-exported API)
from leaps.errors import LeapsError
from leaps.taps import NormStatsRecorder, TapRecorder

TERMS = ("total", "ce", "priming", "coherence", "feature", "verifier_ce", "target_prob")


@dataclass
class InversionState:
    """What a resumed run needs to continue exactly where it stopped."""

    step: int
    param: Tensor  # what the optimiser moves: x* itself for `pixels` (see params.py)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: Any
    history: dict[str, list[float]] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LeapsError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeapsError("CUDA was asked for but is not available; use --device cpu or auto")
    return device


def resample(video: Tensor, frames: int, size: int) -> Tensor:
    """Trilinear resize of ``[B, 3, T, H, W]`` to another model's input size (differentiable)."""
    if video.shape[2:] == (frames, size, size):
        return video
    return F.interpolate(video, size=(frames, size, size), mode="trilinear", align_corners=False)


def _window(clip: Tensor, dy: int, dx: int, flip: bool, top: int, left: int,
            side: int) -> Tensor:
    """``clip`` rolled by (dy, dx) pixels, flipped horizontally if ``flip``, then the
    ``side``-pixel square at (top, left): the same values as ``torch.roll``, ``flip`` and a
    slice, read by one gather per axis (an axis left as it is is not copied)."""
    size = clip.shape[-1]
    if not (dy or dx or flip or side < size):
        return clip
    if dy or side < size:
        rows = (torch.arange(top, top + side, device=clip.device) - dy) % size
        clip = clip.index_select(-2, rows)
    if dx or flip or side < size:
        cols = torch.arange(left, left + side, device=clip.device)
        cols = ((size - 1 - cols) if flip else cols) - dx
        clip = clip.index_select(-1, cols % size)
    return clip


def cosine_with_warmup(iterations: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(round(iterations * warmup))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, iterations - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class Priming:
    """Stimulus-side constants, computed once before the loop."""

    embeddings: list[Tensor]          # per primed tap: [B, C] (per synthesized sample)
    flipped_embeddings: list[Tensor]  # same, for the horizontally flipped stimuli
    weights: Tensor                   # lambda_l of the primed taps
    margin: Tensor                    # delta of R_coh
    # per verifier: the norm-layer statistics to match, laid end to end (mean, var, channels of
    # each layer), as NormStatsRecorder.moments gives x*'s
    norm_targets: list[tuple[Tensor, Tensor, tuple[int, ...]]]
    stimulus_predictions: list[list[int]]      # per target: the model's top-1 per stimulus


class Inverter:
    """Synthesizes ``samples`` clips per target class from ``model``, primed by ``stimuli``.

    ``stimuli[i]`` is a ``[N_i, 3, T, H, W]`` batch in [0, 1] for ``targets[i]`` (several
    stimuli = multi-stimulus priming: their mean embedding). Without stimuli (an empty
    sequence; only with ``priming_weight`` 0) there is no priming, the coherence margin is
    ``coherence_margin`` or 0 (consecutive frames pulled together, nothing pushed apart), and a
    verifier without running statistics cannot be used. ``verifier`` is another
    VideoClassifier, ``"self"``, ``None``, or a sequence of these (several verifiers: R_feat,
    and their cross-entropy where ``verifier_ce_weight`` > 0, averaged over them).

    x* is ``config.param``'s parameter (params.py); each step renders it once and optimises
    the objective averaged over ``config.views`` augmented views of it, run as one batch.
    ``spectrum_pool``: the stimuli whose spectrum ``spectrum_source all`` keeps (default
    ``stimuli``; a run's batch passes the whole run's, so a clip does not depend on its batch).
    """

    def __init__(self, model: VideoClassifier, targets: Sequence[int], stimuli: Sequence[Tensor],
                 config: InvertConfig,
                 verifier: VideoClassifier | str | None | Sequence[VideoClassifier | str] = None,
                 mirrors: Sequence[tuple[str, str]] = (),
                 spectrum_pool: Sequence[Tensor] | None = None) -> None:
        config.validate()
        if None in (config.lambda_1, config.lambda_L, config.r):
            raise LeapsError("lambda_1, lambda_L and r must be set (registry defaults)")
        if stimuli and len(stimuli) != len(targets):
            raise ValueError("one stimulus batch per target (or none at all)")
        if not stimuli and config.priming_weight > 0:
            raise LeapsError("LEAPS primes the model with stimulus videos of the target class: "
                             "give stimuli (or set the priming weight to 0)")
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device).eval()
        given = (list(verifier) if isinstance(verifier, (list, tuple)) else
                 [] if verifier is None else [verifier])
        self.verifiers: list[VideoClassifier] = [
            self.model if v == "self" else v.to(self.device).eval() for v in given
            if v is not None]
        for module in {self.model, *self.verifiers}:
            module.requires_grad_(False)
            if config.channels_last:
                module.to(memory_format=torch.channels_last_3d)
        self.targets = list(targets)
        per_sample = torch.tensor(self.targets).repeat_interleave(config.samples)
        self.y = per_sample.to(self.device)
        self.flip_mode = config.flip if config.flip != "auto" else ("swap" if mirrors else "on")
        mirror_of = {a: b for a, b in mirrors} | {b: a for a, b in mirrors}
        labels = model.labels
        self.y_flipped = torch.tensor([
            labels.index(mirror_of[labels[t]]) if labels[t] in mirror_of else t
            for t in per_sample.tolist()], device=self.device)
        taps = model.taps
        primed = max(1, math.ceil(config.priming_fraction * len(taps)))
        self.primed_taps = taps[:primed]
        self.tap_recorder = TapRecorder(self.primed_taps, frames_of=taps[-1])
        # One R_feat per verifier: its norm layers, their recorder and the weights w_l.
        self.norm_recorders = [NormStatsRecorder(v.norm_layers) if v.norm_layers else None
                               for v in self.verifiers]
        self.norm_weights = [losses.feature_stats_weights(
            len(v.norm_layers), config.first_norm_weight).to(self.device)
            for v in self.verifiers]
        # The verifiers whose cross-entropy joins the objective: same label set, not the model.
        self.ce_verifiers = [
            i for i, v in enumerate(self.verifiers)
            if config.verifier_ce_weight > 0 and v is not self.model
            and tuple(v.labels) == tuple(self.model.labels)]
        stimuli = [s.to(self.device) for s in stimuli]
        self.stimuli = stimuli
        self.priming = self._prime(stimuli)
        spec = self.model.spec
        self.parameterisation = params.build(
            config.param, (len(self.y), 3, spec.frames, spec.size, spec.size), stimuli,
            config.samples, config.spectrum_source, config.warp_grid, pool=spectrum_pool,
            normalisation=([m / spec.value_range for m in spec.mean],
                           [s / spec.value_range for s in spec.std])).to(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=self.device.type == "cuda")
        self.forward = torch.compile(self.model) if config.compile else self.model

    @property
    def verifier(self) -> VideoClassifier | None:
        """The first verifier (the one whose top-1 the run reports)."""
        return self.verifiers[0] if self.verifiers else None

    # -- before the loop ---------------------------------------------------------------
    @torch.no_grad()
    def _prime(self, stimuli: list[Tensor]) -> Priming:
        config = self.config
        samples = config.samples
        if not stimuli:
            margin = torch.tensor(float(config.coherence_margin or 0.0), device=self.device)
            return Priming([], [], torch.zeros(0, device=self.device), margin,
                           self._norm_targets([]), [[] for _ in self.targets])
        per_target, per_target_flipped, predictions, frames = [], [], [], []
        for batch in stimuli:
            self.tap_recorder.reset()
            logits = self.model(batch)
            predictions.append(logits.argmax(dim=1).tolist())
            per_target.append([e.mean(dim=0) for e in self.tap_recorder.collected()])
            frames.append(self.tap_recorder.frames)
            self.tap_recorder.reset()
            self.model(batch.flip(-1))
            per_target_flipped.append([e.mean(dim=0) for e in self.tap_recorder.collected()])

        def per_sample(groups: list[list[Tensor]]) -> list[Tensor]:
            return [torch.stack([g[tap] for g in groups]).repeat_interleave(samples, dim=0)
                    for tap in range(len(self.primed_taps))]

        margin = (torch.tensor(float(config.coherence_margin), device=self.device)
                  if config.coherence_margin is not None else
                  losses.coherence_margin(torch.cat(frames)))
        weights = losses.priming_weights(len(self.model.taps), config.lambda_1, config.lambda_L)
        return Priming(per_sample(per_target), per_sample(per_target_flipped),
                       weights[:len(self.primed_taps)].to(self.device), margin,
                       self._norm_targets(stimuli), predictions)

    def _norm_targets(self, stimuli: list[Tensor]
                      ) -> list[tuple[Tensor, Tensor, tuple[int, ...]]]:
        """Per verifier: running stats where it has them; otherwise estimated from the stimuli
        (a BN-free verifier, which the paper's method could not use). Laid end to end."""
        targets = []
        for verifier, recorder in zip(self.verifiers, self.norm_recorders):
            layers = verifier.norm_layers
            if recorder is None:
                pairs = []
            elif all(layer.has_stats for layer in layers):
                pairs = [(layer.running_mean.float(), layer.running_var.float())
                         for layer in layers]
            elif not stimuli:
                raise LeapsError(
                    f"the verifier {verifier.model_name} has no running statistics (no "
                    "BatchNorm) and there are no stimuli to estimate them from; give stimuli, "
                    "a verifier with BatchNorm, or no verifier")
            else:
                spec = verifier.spec
                clips = torch.cat([resample(s, spec.frames, spec.size) for s in stimuli])
                recorder.reset()
                verifier(clips)
                pairs = [(m.detach(), v.detach()) for m, v in recorder.collected()]
            targets.append((torch.cat([m for m, _ in pairs]) if pairs else torch.zeros(0),
                            torch.cat([v for _, v in pairs]) if pairs else torch.zeros(0),
                            tuple(m.shape[-1] for m, _ in pairs)))
        return targets

    def initial_state(self, clip_seeds: Sequence[int] | None = None) -> InversionState:
        """The state before the first step. ``clip_seeds`` (one per clip) draws each clip's
        initial parameter from its own seed, so it does not depend on the batch it is in; by
        default all of it comes from ``config.seed``."""
        if self.config.init == "stimulus":
            param = self.parameterisation.encode(self._starting_stimuli(clip_seeds))
        else:
            if clip_seeds is None:
                shared = torch.Generator().manual_seed(self.config.seed)
                generators = [shared] * len(self.y)
            else:
                generators = [torch.Generator().manual_seed(seed) for seed in clip_seeds]
            param = self.parameterisation.init(generators)
        param = param.to(self.device)
        optimizer, scheduler = self._optimizer(param)
        return InversionState(0, param, optimizer.state_dict(), scheduler.state_dict(),
                              random.Random(self.config.seed).getstate(),
                              {term: [] for term in TERMS})

    def _starting_stimuli(self, clip_seeds: Sequence[int] | None) -> Tensor:
        """``--init stimulus``: each clip starts as one of its target's stimuli, picked by the
        clip's seed (clip i of the batch by ``config.seed + i`` without seeds)."""
        params.check_stimuli("pixels", "stimulus", self.stimuli)
        seeds = list(clip_seeds) if clip_seeds is not None else [
            self.config.seed + i for i in range(len(self.y))]
        per_clip = [s for s in self.stimuli for _ in range(self.config.samples)]
        return torch.stack([group[seed % len(group)]
                            for group, seed in zip(per_clip, seeds)]).cpu()

    def _optimizer(self, param: Tensor) -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.Adam([param], lr=self.config.lr, betas=(0.5, 0.9))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(self.config.iterations, self.config.warmup))
        return optimizer, scheduler

    @torch.no_grad()
    def render(self, param: Tensor) -> Tensor:
        """The clips ``[B, 3, T, H, W]`` in [0, 1] that a parameter stands for."""
        return self.parameterisation.render(param.to(self.device)).float()

    # -- one step ----------------------------------------------------------------------
    def views(self, clip: Tensor, shift: int, rng: random.Random) -> tuple[Tensor, Tensor | bool]:
        """``config.views`` augmented views of the clips, as one batch ``[K*B, ...]``, and
        which of them are flipped with their target swapped to its mirror: a bool when all views
        agree, else a ``[K*B]`` mask.

        Each view: a random roll of up to ``shift`` pixels, a flip (per ``flip_mode``), then
        where enabled a random resized crop, a temporal shift (edge frames repeated) and
        additive Gaussian noise. Every random choice comes from ``rng`` (the resumable state).
        Roll, flip and crop window are one gather per axis; the resize is bilinear per frame.
        """
        config = self.config
        size, frames = clip.shape[-1], clip.shape[2]
        views, swapped = [], []
        for _ in range(config.views):
            dx, dy = rng.randint(-shift, shift), rng.randint(-shift, shift)
            flip = self.flip_mode != "off" and rng.random() < 0.5
            side, top, left = size, 0, 0
            if config.crop < 1:
                side = max(1, round(rng.uniform(config.crop, 1.0) * size))
                top, left = rng.randint(0, size - side), rng.randint(0, size - side)
            view = _window(clip, dy, dx, flip, top, left, side)
            if side < size:
                view = F.interpolate(view.flatten(1, 2), size=(size, size), mode="bilinear",
                                     align_corners=False).unflatten(1, (clip.shape[1], frames))
            if config.time_shift:
                dt = rng.randint(-config.time_shift, config.time_shift)
                if dt:
                    index = (torch.arange(frames, device=view.device) - dt).clamp(0, frames - 1)
                    view = view.index_select(2, index)
            if config.noise > 0:
                generator = torch.Generator(view.device).manual_seed(rng.getrandbits(63))
                noise = torch.randn(view.shape, generator=generator, device=view.device,
                                    dtype=view.dtype)
                # in place where the view is a copy of its own (none of its producers' backward
                # reads it); the render itself may feed other views
                view = (view.add_(noise, alpha=config.noise) if view is not clip else
                        view + config.noise * noise)
            views.append(view)
            swapped.append(flip and self.flip_mode == "swap")
        batch = views[0] if len(views) == 1 else torch.cat(views)
        if all(swapped) or not any(swapped):
            return batch, swapped[0]
        mask = torch.tensor(swapped, device=self.device).repeat_interleave(len(self.y))
        return batch, mask

    def objective(self, video: Tensor, swapped: Tensor | bool) -> dict[str, Tensor]:
        """All loss terms for a batch of views of x* (``[K*B, ...]``, view-major), each
        averaged over the views; ``swapped``: per view, whether it was flipped with its target
        swapped to the mirror class (a ``[K*B]`` mask, or a bool for all). No host sync."""
        config = self.config
        repeat = video.shape[0] // len(self.y)
        pairs = list(zip(self.priming.embeddings, self.priming.flipped_embeddings))
        if isinstance(swapped, bool):  # every view alike: pick, nothing to select per row
            target = self.y_flipped if swapped else self.y
            stimulus = [f if swapped else e for e, f in pairs]
            if repeat > 1:
                target = target.repeat(repeat)
                stimulus = [s.repeat(repeat, 1) for s in stimulus]
        else:
            swapped = swapped.to(self.device).expand(video.shape[0])
            target = torch.where(swapped, self.y_flipped.repeat(repeat), self.y.repeat(repeat))
            stimulus = [torch.where(swapped[:, None], f.repeat(repeat, 1), e.repeat(repeat, 1))
                        for e, f in pairs]
        self.tap_recorder.reset()
        for recorder in self.norm_recorders:
            if recorder is not None:
                recorder.reset()
        verifier_logits = {}  # verifier index -> its logits (the model's own pass is shared)
        with self.autocast:
            logits = self.forward(video)
            for i, verifier in enumerate(self.verifiers):
                if verifier is not self.model:
                    spec = verifier.spec
                    verifier_logits[i] = verifier(resample(video, spec.frames, spec.size))
        zero = logits.new_zeros((), dtype=torch.float32)
        features = [losses.feature_stats_distance(*recorder.moments(), *targets, weights)
                    for recorder, targets, weights in zip(
                        self.norm_recorders, self.priming.norm_targets, self.norm_weights)
                    if recorder is not None]
        verifier_ce = [losses.cross_entropy(verifier_logits[i], target) for i in self.ce_verifiers]
        terms = {
            "ce": losses.cross_entropy(logits, target),
            "priming": (losses.priming_loss(self.tap_recorder.collected(), stimulus,
                                            self.priming.weights)
                        if stimulus else zero),
            "coherence": losses.coherence_loss(self.tap_recorder.frames, self.priming.margin),
            "feature": (features[0] if len(features) == 1 else
                        torch.stack(features).mean() if features else zero),
            "verifier_ce": torch.stack(verifier_ce).mean() if verifier_ce else zero,
        }
        terms["total"] = (config.ce_weight * terms["ce"]
                          + config.priming_weight * terms["priming"]
                          + config.r * (config.coherence_weight * terms["coherence"]
                                        + config.feature_weight * terms["feature"]))
        if verifier_ce:
            terms["total"] = terms["total"] + config.verifier_ce_weight * terms["verifier_ce"]
        probs = logits.detach().float().softmax(dim=1)
        terms["target_prob"] = probs.gather(1, target[:, None]).mean()
        return terms

    def run(self, state: InversionState | None = None,
            on_log: Callable[[int, dict[str, float]], None] | None = None,
            on_save: Callable[[InversionState], None] | None = None) -> InversionState:
        """Optimise from ``state`` (a fresh one by default) to ``config.iterations`` steps.

        ``on_log(step, last_terms)`` is called every ``log_every`` steps (the only host sync);
        ``on_save(state)`` every ``save_every`` steps and when interrupted (Ctrl-C), after
        which KeyboardInterrupt propagates. A non-finite loss stops the run with a LeapsError
        naming the term, after ``on_save`` got the last finite state.
        """
        config = self.config
        state = state or self.initial_state()
        param = state.param.to(self.device).requires_grad_(True)
        optimizer, scheduler = self._optimizer(param)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        rng = random.Random()
        rng.setstate(state.rng)
        history = state.history
        pending: list[Tensor] = []
        good = (state.step, param.detach().clone(), copy.deepcopy(optimizer.state_dict()),
                scheduler.state_dict(), rng.getstate())

        def snapshot(step: int) -> InversionState:
            return InversionState(step, param.detach().clone(),
                                  copy.deepcopy(optimizer.state_dict()), scheduler.state_dict(),
                                  rng.getstate(), copy.deepcopy(history))

        def flush(step: int) -> None:
            nonlocal good
            if not pending:
                return
            rows = torch.stack(pending).cpu().tolist()  # the one sync per log interval
            pending.clear()
            for offset, row in enumerate(rows):
                bad = [t for t, v in zip(TERMS, row) if not math.isfinite(v)]
                if bad:
                    failed_at = step - len(rows) + offset + 1
                    g_step, g_param, g_opt, g_sched, g_rng = good
                    if on_save is not None:
                        on_save(InversionState(g_step, g_param, g_opt, g_sched, g_rng, history))
                    raise LeapsError(
                        f"the loss diverged at step {failed_at}: {', '.join(bad)} became "
                        f"non-finite; the last good state (step {g_step}) is kept; lower --lr "
                        "or the weight of that term")
                for term, value in zip(TERMS, row):
                    history[term].append(value)
            good = (step, param.detach().clone(), copy.deepcopy(optimizer.state_dict()),
                    scheduler.state_dict(), rng.getstate())
            if on_log is not None:
                on_log(step, dict(zip(TERMS, rows[-1])))

        render, project_ = self.parameterisation.render, self.parameterisation.project_
        step = state.step
        try:
            while step < config.iterations:
                shift = config.jitter_pixels(step, self.model.spec.size)
                batch, swapped = self.views(render(param), shift, rng)
                terms = self.objective(batch, swapped)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                optimizer.step()
                scheduler.step()
                project_(param)
                pending.append(torch.stack([terms[t].detach().float() for t in TERMS]))
                step += 1
                if step % config.log_every == 0 or step == config.iterations:
                    flush(step)
                if on_save is not None and step % config.save_every == 0:
                    flush(step)  # a saved state's history reaches its step (a kill loses none)
                    on_save(snapshot(step))
        except KeyboardInterrupt:
            # Keep only fully logged steps, so a resumed run repeats none and skips none.
            g_step, g_param, g_opt, g_sched, g_rng = good
            if on_save is not None:
                on_save(InversionState(g_step, g_param, g_opt, g_sched, g_rng, history))
            raise
        return snapshot(step)

    @torch.no_grad()
    def evaluate(self, video: Tensor) -> dict[str, Any]:
        """Target probability and top-1 of the final clips, by the model and the verifier."""
        video = video.to(self.device)
        probs = self.model(video).float().softmax(dim=1)
        result: dict[str, Any] = {
            "target_prob": probs.gather(1, self.y[:, None]).squeeze(1).tolist(),
            "model_top1": probs.argmax(dim=1).tolist(),
        }
        result["model_accuracy"] = float((probs.argmax(dim=1) == self.y).float().mean())
        if self.verifier is not None:
            spec = self.verifier.spec
            v_probs = self.verifier(resample(video, spec.frames, spec.size)).float().softmax(1)
            if len(self.verifier.labels) == len(self.model.labels) and \
                    tuple(self.verifier.labels) == tuple(self.model.labels):
                v_top1 = v_probs.argmax(dim=1)
                result["verifier_top1"] = v_top1.tolist()
                result["verifier_accuracy"] = float((v_top1 == self.y).float().mean())
        return result

    def close(self) -> None:
        self.tap_recorder.close()
        for recorder in self.norm_recorders:
            if recorder is not None:
                recorder.close()



def warn(message: str) -> None:
    _line(sys.stderr, f"warning: {message}")


def _line(stream: Any, text: str) -> None:
    """Write ``text`` and its newline in one write, flushed: ``print`` on a terminal writes
    them separately, and the lines of torchrun's processes, which share the terminal, would
    interleave mid-line."""
    stream.write(f"{text}\n")
    stream.flush()


def check_stimulus_predictions(inverter: Inverter, stimulus_names: Sequence[Sequence[str]],
                               on_warning: Callable[[str], None] = warn) -> None:
    """Warn about each stimulus the model does not classify as its target."""
    labels = inverter.model.labels
    for target, names, predicted in zip(inverter.targets, stimulus_names,
                                        inverter.priming.stimulus_predictions):
        for name, top1 in zip(names, predicted):
            if top1 != target:
                on_warning(f"stimulus {name} is classified as {labels[top1]!r}, not the target "
                           f"{labels[target]!r}; priming with it may pull toward the wrong class")



# -- the Python API ------------------------------------------------------------------------
@dataclass
class InversionResult:
    """What :func:`invert` returns."""

    video: Tensor                    # [B, 3, T, H, W] in [0, 1]
    targets: list[int]               # class index per synthesized clip
    labels: list[str]                # class name per synthesized clip
    history: dict[str, list[float]]  # loss terms per iteration
    metrics: dict[str, Any]
    run_dir: Path | None
    verifier: str | None = None      # the verifier's name ('self', 'none', a registry model)


def resolve_target(target: str | int, labels: Sequence[str]) -> int:
    """A class given by name or index -> its index (errors name close matches)."""
    import difflib

    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        index = int(target)
        if not 0 <= index < len(labels):
            raise LeapsError(f"target index {index} is out of range: the label set has "
                             f"{len(labels)} classes (0..{len(labels) - 1})")
        return index
    if target in labels:
        return list(labels).index(target)
    close = difflib.get_close_matches(target, list(labels), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(labels[:20]) + (f" ... ({len(labels)} classes)" if len(labels) > 20
                                      else "")
    raise LeapsError(f"unknown target class {target!r}; {hint}give a class name of the model's "
                     f"label set or its index (classes: {shown})")


def group_stimuli(targets: Sequence[str | int], stimuli: Sequence[str | Path]
                  ) -> list[list[str]]:
    """Which stimuli prime which target.

    One target: every stimulus primes it (multi-stimulus priming). Several targets: either one
    stimulus each, in order, or stimuli written ``CLASS=PATH``.
    """
    named = [str(s).split("=", 1) for s in stimuli if "=" in str(s) and not Path(str(s)).exists()]
    if named:
        if len(named) != len(stimuli):
            raise LeapsError("mix of CLASS=PATH and plain stimuli; give all stimuli as "
                             "CLASS=PATH or none")
        groups = {str(t): [] for t in targets}
        for cls, path in named:
            if cls not in groups:
                raise LeapsError(f"stimulus {cls}={path} names a class that is not a target "
                                 f"({', '.join(groups)}); add --target {cls}")
            groups[cls].append(path)
        empty = [t for t, paths in groups.items() if not paths]
        if empty:
            raise LeapsError(f"no stimulus for target(s) {', '.join(empty)}; add CLASS=PATH")
        return [groups[str(t)] for t in targets]
    if len(targets) == 1:
        return [[str(s) for s in stimuli]]
    if len(stimuli) != len(targets):
        raise LeapsError(f"{len(targets)} targets but {len(stimuli)} stimuli: give one stimulus "
                         "per target in order, or write them as CLASS=PATH")
    return [[str(s)] for s in stimuli]


def invert(model: str | None = None, *, adapter: str | None = None,
           targets: Sequence[str | int] = (), stimuli: Sequence[str | Path] = (),
           verifier: str | Sequence[str] | None = None,
           checkpoint: str | Path | None = None,
           labels: str | Path | None = None, config: InvertConfig | None = None,
           out: str | Path | None = None, resume: str | Path | None = None,
           reduced: bool = False, progress: bool = True,
           on_warning: Callable[[str], None] = warn,
           changes: dict[str, Any] | None = None,
           verifier_checkpoint: str | Path | None = None,
           stimuli_dir: str | Path | None = None, model_config: str | Path | None = None,
           frames: int | None = None, size: int | None = None) -> InversionResult:
    """Synthesize clips of ``targets`` from a registry model, primed by stimulus videos.

    ``model``/``adapter`` pick the registry entry, or ``model_config`` is the model's own
    config file (an mmaction2 config; :mod:`leaps.model_files`; ``adapter`` then forces the
    adapter, ``frames``/``size`` override its input size, ``labels`` names its classes);
    ``stimuli_dir`` holds stimuli per class (``DIR/<class>/*`` or ``DIR/<class>_*.*``);
    ``verifier`` is a registry model, ``"self"``, ``"none"``, a list of registry models /
    ``"self"`` (several verifiers) or None (the entry's default); ``checkpoint``/``labels``
    load a fine-tuned model;
    ``out`` is the run directory (None: no files are written); ``resume`` continues an
    interrupted run from its directory with the options it was started with (``changes``:
    InvertConfig values given again; only :data:`~leaps.config.MAY_CHANGE_ON_RESUME` may
    differ from the run's, and model, targets, stimuli ... given must equal the run's) and
    finishes a run whose optimisation ended but whose outputs were not all written; ``reduced``
    builds the models at their small test size. Random weights (an entry without a checkpoint)
    are initialised from ``config.seed``. Everything is validated before any file is written;
    the run directory is held by this process alone (a second writer gets an error).

    The clips are optimised in batches of ``config.batch_size`` (:mod:`leaps.batches`), each
    with its own resumable state; under torchrun every process runs its share of the batches
    and rank 0 writes the merged outputs, the same as one process would.
    """
    from leaps.batches import Processes

    held: list[Any] = []  # the run directory's lock, released whatever happens
    processes = Processes.from_environment()
    try:
        run = prepare_run(model, adapter=adapter, targets=targets, stimuli=stimuli,
                          verifier=verifier, checkpoint=checkpoint, labels=labels,
                          config=config, out=out, resume=resume, reduced=reduced,
                          on_warning=on_warning, changes=changes or {},
                          processes=processes, held=held,
                          verifier_checkpoint=verifier_checkpoint, stimuli_dir=stimuli_dir,
                          model_config=model_config, frames=frames, size=size)
        todo = processes.broadcast([b for b in run.batches if not run.is_done(b)])
        run.work(processes.share(todo), progress)
        processes.barrier()
        return run.finish()
    finally:
        for lock in held:
            lock.release()
        processes.close()


@dataclass
class PreparedRun:
    """One inversion, validated and built, its batches planned (by :func:`prepare_run`):
    :meth:`work` runs batches, :meth:`finish` merges them and (rank 0) writes the outputs."""

    classifier: VideoClassifier
    verifier_models: list[VideoClassifier | str]
    config: InvertConfig
    indices: list[int]             # class index of each target
    class_names: list[str]
    groups: list[list[str]]        # stimulus paths of each target
    clips: list[Tensor]            # stimulus clips of each target
    mirrors: list[tuple[str, str]]
    record: dict[str, Any]         # run.json
    run_dir: Path | None
    created: bool                  # this run created run_dir
    held: list[Any]                # the run directory's lock (rank 0)
    batches: list[Any]
    files: Any                     # BatchFiles, None without a run directory
    processes: Any
    on_warning: Callable[[str], None]
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # batches run here

    def is_done(self, batch: Any) -> bool:
        return batch.index in self.results or (
            self.files is not None and self.files.done_path(batch).is_file())

    def inverter(self, batch: Any) -> Inverter:
        """The Inverter of one batch: its clips' targets (one sample each) and stimuli, its
        own jitter seed, this rank's device."""
        from dataclasses import replace

        from leaps.batches import batch_seed

        config = replace(self.config, samples=1, seed=batch_seed(self.config.seed, batch.index),
                         device=self.processes.device(self.config.device))
        return Inverter(self.classifier, [self.indices[t] for t, _ in batch.clips],
                        [self.clips[t] for t, _ in batch.clips] if self.clips else [],
                        config, self.verifier_models, self.mirrors, spectrum_pool=self.clips)

    def work(self, batches: Sequence[Any], progress: bool) -> None:
        """Run ``batches`` (this process's share) one after the other."""
        for number, batch in enumerate(batches, 1):
            if self.is_done(batch):
                continue
            label = " ".join(filter(None, [
                "leaps", self.processes.label,
                f"{self.record['model']} batch {batch.index + 1}/{len(self.batches)}"
                if len(self.batches) > 1 else ""]))
            self.run_batch(batch, progress, label)

    def run_batch(self, batch: Any, progress: bool, label: str = "leaps") -> None:
        from leaps.batches import clip_seed, who
        from leaps.files import WriteError

        run_dir, files = self.run_dir, self.files
        inverter = self.inverter(batch)
        state = files.load_state(batch) if files is not None else None
        if state is None:
            check_stimulus_predictions(
                inverter, [self.groups[t] if s == 0 and self.groups else []
                           for t, s in batch.clips], self.on_warning)
            state = inverter.initial_state(
                [clip_seed(self.config.seed, self.indices[t], s) for t, s in batch.clips])

        def on_save(snapshot: InversionState) -> None:
            if files is not None:
                files.save_state(batch, snapshot)

        started = time.perf_counter()
        try:
            with _progress(progress, self.config.iterations, state.step, label,
                           plain=self.processes.world > 1) as update:
                final = inverter.run(state, on_log=update, on_save=on_save)
            video = inverter.render(final.param)
            metrics = inverter.evaluate(video)
        except KeyboardInterrupt:
            self._set_status("interrupted")
            raise
        except WriteError as exc:
            raise self.write_failure(exc, finished=False) from None
        except LeapsError:
            self._set_status("diverged")
            raise
        finally:
            inverter.close()
        result = {"index": batch.index, "clips": [list(c) for c in batch.clips],
                  "video": video.detach().cpu(), "steps": final.step,
                  "history": final.history, "metrics": metrics,
                  "elapsed_s": round(time.perf_counter() - started, 3),
                  "rank": self.processes.rank, "world_size": self.processes.world,
                  "device": str(inverter.device), **who()}
        if files is not None:
            assert run_dir is not None
            try:
                files.finish(batch, result)
            except WriteError as exc:
                raise self.write_failure(exc, finished=False) from None
        self.results[batch.index] = result

    def _set_status(self, status: str) -> None:
        if self.run_dir is not None and self.processes.rank == 0:
            from leaps import runs

            self.record["status"] = status
            runs.write_json(self.run_dir / runs.RUN_FILE, self.record)

    def write_failure(self, exc: Any, finished: bool) -> LeapsError:
        """The one line for a refused write after the run directory holds a run."""
        from leaps import runs

        run_dir = self.run_dir
        assert run_dir is not None
        if finished:
            return exc.with_fix(f"the finished optimisation is kept in {run_dir}: free space, "
                                f"then `leaps invert --resume {run_dir}` writes the outputs")
        if self.files.saved():
            return exc.with_fix(f"the last saved state is kept: free space, then continue with "
                                f"`leaps invert --resume {run_dir}`")
        if self.created and self.held and self.processes.world == 1:
            runs.remove_new_run_dir(run_dir, self.created, self.held.pop())
            return exc.with_fix(f"nothing was saved yet ({run_dir} is removed); free space, or "
                                "pass another --out")
        return exc.with_fix("nothing was saved yet; free space and run again")

    def collect(self) -> dict[int, dict[str, Any]]:
        """Every batch's result: from the run directory's files, or (no directory) gathered
        from the processes that ran them."""
        if self.files is None:
            merged: dict[int, dict[str, Any]] = {}
            for part in self.processes.gather(self.results):
                merged.update(part)
            return self.processes.broadcast(merged)
        results = {}
        for batch in self.batches:
            result = self.results.get(batch.index) or self.files.result(batch)
            if result is None:
                raise LeapsError(f"batch {batch.index} of {self.run_dir} has no result after all "
                                 "processes finished (a process died?); continue with "
                                 f"`leaps invert --resume {self.run_dir}`")
            results[batch.index] = result
        return results

    def finish(self) -> InversionResult:
        """Merge the batches in clip order; rank 0 writes video.pt, the GIFs/MP4s, grid.png,
        loss.png and run.json (with who ran which batch), then drops the batch files."""
        from leaps import runs
        from leaps.files import WriteError

        results = self.collect()
        ordered = [results[b.index] for b in self.batches]
        video = torch.cat([r["video"] for r in ordered])
        history = merge_histories([(r["history"], len(r["clips"])) for r in ordered])
        metrics = merge_metrics([r["metrics"] for r in ordered])
        per_sample = [self.class_names[self.indices[t]] for b in self.batches for t, _ in b.clips]
        metrics["target_names"] = per_sample
        steps = max(int(r["steps"]) for r in ordered)
        run_dir = self.run_dir
        if run_dir is not None and self.processes.rank == 0:
            self.record.update(
                status="done", steps=steps, history=history, metrics=metrics,
                elapsed_s=round(sum(float(r["elapsed_s"]) for r in ordered), 3),
                world_size=self.processes.world,
                batches=[{k: r[k] for k in ("index", "clips", "rank", "world_size", "host",
                                            "pid", "device", "steps", "elapsed_s")}
                         for r in ordered])
            try:
                self.record["files"] = runs.write_outputs(
                    run_dir, video, [c[0] for c in self.clips], per_sample, history,
                    stimulus_labels=[self.class_names[i] for i in self.indices][:len(self.clips)])
                runs.write_json(run_dir / runs.RUN_FILE, self.record)
            except WriteError as exc:
                raise self.write_failure(exc, finished=True) from None
            # Only now, with every output written and run.json saying done, the batches go.
            self.files.remove()
        y = [self.indices[t] for b in self.batches for t, _ in b.clips]
        return InversionResult(video, y, per_sample, history, metrics, run_dir,
                               self.record.get("verifier"))


def merge_histories(parts: Sequence[tuple[dict[str, list[float]], int]]
                    ) -> dict[str, list[float]]:
    """The run's loss history: per step, the clip-weighted mean of its batches' values (one
    batch: its own history)."""
    merged: dict[str, list[float]] = {}
    for term in TERMS:
        length = max((len(h.get(term, [])) for h, _ in parts), default=0)
        column = []
        for step in range(length):
            pairs = [(h[term][step], n) for h, n in parts if len(h.get(term, [])) > step]
            column.append(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))
        merged[term] = column
    return merged


def merge_metrics(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The batches' per-clip metrics concatenated in clip order, accuracies over all clips."""
    merged: dict[str, Any] = {}
    for key in ("target_prob", "model_top1", "verifier_top1"):
        if all(key in p for p in parts):
            merged[key] = [v for p in parts for v in p[key]]
    for key, per_clip in (("model_accuracy", "model_top1"),
                          ("verifier_accuracy", "verifier_top1")):
        if all(key in p for p in parts):
            counts = [len(p[per_clip]) for p in parts]
            merged[key] = sum(p[key] * n for p, n in zip(parts, counts)) / sum(counts)
    return merged


def prepare_run(model: str | None = None, *, adapter: str | None = None,
                targets: Sequence[str | int] = (), stimuli: Sequence[str | Path] = (),
                verifier: str | None = None, checkpoint: str | Path | None = None,
                labels: str | Path | None = None, config: InvertConfig | None = None,
                out: str | Path | None = None, resume: str | Path | None = None,
                reduced: bool = False, on_warning: Callable[[str], None] = warn,
                changes: dict[str, Any] | None = None, processes: Any = None,
                held: list[Any] | None = None, verifier_checkpoint: str | Path | None = None,
                stimuli_dir: str | Path | None = None, model_config: str | Path | None = None,
                frames: int | None = None, size: int | None = None) -> PreparedRun:
    """Validate, build the models, plan the batches and (rank 0) claim the run directory and
    write run.json: everything :func:`invert` does before the optimisation. The run
    directory's lock is appended to ``held`` (the caller releases it). ``verifier_checkpoint``
    loads the verifier's weights; ``stimuli_dir`` is a folder of ``<class>_<n>.<ext>`` stimulus
    videos (a registry entry's ``stimuli`` layout) used where no stimulus is given."""
    from leaps import runs
    from leaps.adapter import checkpoint_sha256, untrained_statistics
    from leaps.batches import BatchFiles, Processes, on_rank0, plan_batches
    from leaps.files import WriteError
    from leaps.model_files import config_record, resolve_model_options, restore_model
    from leaps.plugins import get_host
    from leaps.registry import build_model, load_registry, missing_requirements, registry_files
    from leaps.video import class_clips, read_clips

    processes = processes or Processes()
    held = held if held is not None else []
    changes = changes or {}
    rank0 = processes.rank == 0
    resuming = resume is not None
    forced_adapter: str | None = None
    if resuming:
        run_dir: Path | None = Path(resume)
        saved = runs.read_run(run_dir)
        if saved.get("status") == "done":
            raise LeapsError(f"run {run_dir} is finished: nothing to resume (its outputs are "
                             "there); start a new run with another --out")
        if rank0:
            held.append(runs.claim_run_dir(run_dir, new=False, on_warning=on_warning))
        runs.check_resume_arguments(saved, model=model, adapter=adapter, targets=targets,
                                    stimuli=stimuli, verifier=verifier, checkpoint=checkpoint,
                                    labels=labels, reduced=reduced,
                                    verifier_checkpoint=verifier_checkpoint,
                                    model_config=model_config, frames=frames, size=size)
        if stimuli_dir is not None:
            raise LeapsError("--stimuli cannot be given with --resume: a resumed run keeps its "
                             "stimuli; drop --stimuli")
        model, adapter = restore_model(saved, run_dir), None
        targets, groups = saved["targets"], saved["stimuli"]
        verifier = saved.get("verifiers") or saved["verifier"]
        checkpoint, labels = saved["checkpoint"], saved["labels"]
        verifier_checkpoint = saved.get("verifier_checkpoint")
        reduced = saved["reduced"]
        config = InvertConfig.from_dict(saved["config"])
        batch_files = BatchFiles(run_dir, runs.resume_identity(saved))
        planned = plan_batches(len(saved["target_indices"]), config.samples, config.batch_size)
        done = batch_files.steps_done(planned)
        config, notes = config.resumed_with(changes, done)
        if rank0:
            for note in notes:
                on_warning(note)
            if planned and all(batch_files.done_path(b).is_file() for b in planned):
                on_warning(f"the optimisation of {run_dir} finished ({done} steps); writing "
                           "its outputs")
    else:
        run_dir = Path(out) if out is not None else None
        if not targets:
            raise LeapsError("name at least one target class (--target CLASS, or --target all)")
        (config or InvertConfig()).validate()
        if run_dir is not None and rank0:
            runs.check_new_run_dir(run_dir)
        if stimuli and stimuli_dir is not None:
            raise LeapsError("give stimuli either as a folder (--stimuli DIR) or one by one "
                             "(--stimulus PATH), not both")
        groups = []
        forced_adapter = adapter if model_config is not None else None
        model, adapter, _ = resolve_model_options(
            model, adapter, model_config, frames, size, labels,
            on_warning if rank0 else (lambda _: None))
    registry = load_registry()
    spec = registry.resolve(model, adapter)
    seed = (config or InvertConfig()).seed
    classifier = _seeded(seed, lambda: build_model(spec.name, checkpoint=checkpoint,
                                                   labels=labels, reduced=reduced))
    class_names = classifier.labels
    priming = (config or InvertConfig()).priming_weight > 0
    every = not resuming and list(targets) == ["all"] and "all" not in class_names
    found: dict[str, list[Path]] = {}
    if not resuming and stimuli_dir is not None:
        found = class_clips(stimuli_dir, class_names, on_warning if rank0 else (lambda _: None))
    if every:
        # `all` with stimuli per class: every class that has some (as with a folder)
        named = {str(s).split("=", 1)[0] for s in stimuli
                 if "=" in str(s) and not Path(str(s)).exists()}
        for name in sorted(named):
            resolve_target(name, class_names)  # an unknown class: error with close matches
        having = found or named
        targets = [name for name in class_names if name in having] if having \
            else list(class_names)
    indices = [resolve_target(t, class_names) for t in targets]
    if not resuming and stimuli:
        groups = group_stimuli(targets, stimuli)
    if found:
        lacking = [class_names[i] for i in indices if class_names[i] not in found]
        if lacking and priming:
            raise LeapsError("LEAPS primes the model with stimulus videos of the target class "
                             f"and {stimuli_dir} holds none for {', '.join(lacking)} (files "
                             "named <class>_<n>.mp4, or <class>/ folders of clips): add them, "
                             "or pass --priming-weight 0 to invert without priming")
        if lacking and rank0:
            on_warning(f"{stimuli_dir} holds no clips of {', '.join(lacking)}: inverting "
                       "without stimuli (--priming-weight 0)")
        groups = [] if lacking else [[str(p) for p in found[class_names[i]]] for i in indices]
    if not resuming and not groups and priming:
        groups = [[str(p) for p in spec.stimulus_files(class_names[i])] for i in indices]
        missing = [class_names[i] for i, group in zip(indices, groups) if not group]
        if missing:
            raise LeapsError("LEAPS primes the model with stimulus videos of the target class "
                             f"and {spec.name!r} ships none for {', '.join(missing)}: pass "
                             "--stimulus PATH or --stimuli FOLDER (or --priming-weight 0 to "
                             "invert without priming)")
    fs = classifier.spec

    def short(source: str | Path, count: int) -> None:
        on_warning(f"stimulus {source} has {count} frame(s), fewer than the model's "
                   f"{fs.frames}: its frames are repeated in order (stretched in time), not "
                   "looped")

    quiet = resuming or not rank0
    clips = [read_clips(group, fs.frames, fs.size, None if quiet else short,
                        (lambda _: None) if quiet else on_warning)
             for group in groups]
    setting = config or InvertConfig()
    params.check_stimuli(setting.param, setting.init, clips)  # before anything is written
    if not clips and setting.param != "pixels" and not quiet:
        on_warning(f"no stimuli: --param {setting.param} takes the amplitude spectrum of natural "
                   "scenes (1/f) at the model's input mean and std")
    verifier_names = ([spec.verifier] if verifier is None else
                      [verifier] if isinstance(verifier, str) else list(verifier) or ["none"])
    if "none" in verifier_names and len(verifier_names) > 1:
        raise LeapsError("--verifier none cannot be combined with other verifiers")
    verifier_models: list[VideoClassifier | str] = []
    for name in verifier_names:
        if name in ("self", "none"):
            verifier_models += ["self"] if name == "self" else []
            continue
        reason = missing_requirements(registry.get(name))
        if reason:
            raise LeapsError(f"verifier {name!r} is not usable here: {reason}; pick "
                             "another with --verifier (or self/none)")
        # --verifier-checkpoint: the weights of the first verifier named.
        weights = verifier_checkpoint if name == verifier_names[0] else None
        built = _seeded(seed, lambda name=name, weights=weights: build_model(
            name, reduced=reduced, checkpoint=weights))
        if not reduced and rank0 and not resuming and untrained_statistics(built):
            on_warning(f"verifier {name} runs with untrained BatchNorm statistics "
                       "(random weights: no checkpoint was loaded), so R_feat pulls the clips "
                       "toward mean 0 and variance 1, not toward real videos; pass "
                       "--verifier-checkpoint PATH with its weights, or --verifier none")
        verifier_models.append(built)
    verifier_name = verifier_names[0]
    if verifier_checkpoint is not None and verifier_name in ("self", "none"):
        raise LeapsError(f"--verifier-checkpoint needs a verifier model, not {verifier_name!r}; "
                         "name one with --verifier (or drop --verifier-checkpoint)")
    config = (config or InvertConfig()).with_registry_defaults(
        spec.leaps.lambda_1, spec.leaps.lambda_L, spec.leaps.r)
    config.validate()
    mirrors = [(a, b) for a, b in spec.mirrors if a in class_names and b in class_names]
    taps = classifier.taps
    record: dict[str, Any] = {
        "format": runs.RUN_FORMAT, "status": "running", "adapter": spec.adapter,
        "model": spec.name,
        "model_config": (config_record(spec, model_config, forced_adapter, frames, size)
                         if model_config is not None and not resuming else None),
        "registry_file": (spec.source if any(str(f.resolve()) == spec.source
                                             for f in registry_files()) else None),
        "stimuli_dir": str(stimuli_dir) if stimuli_dir is not None else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": (checkpoint_sha256(spec.adapter, checkpoint)
                              if checkpoint and Path(str(checkpoint)).exists() else None),
        "labels": str(labels) if labels else None, "verifier": verifier_name,
        "verifier_checkpoint": str(verifier_checkpoint) if verifier_checkpoint else None,
        "verifier_checkpoint_sha256": (
            checkpoint_sha256(registry.get(verifier_name).adapter, verifier_checkpoint)
            if verifier_checkpoint and Path(str(verifier_checkpoint)).exists() else None),
        "verifiers": verifier_names,
        "reduced": reduced, "targets": [str(t) for t in targets],
        "target_indices": indices, "target_names": [class_names[i] for i in indices],
        "stimuli": groups, "config": asdict(config),
        "flip_mode": config.flip if config.flip != "auto" else ("swap" if mirrors else "on"),
        "primed_taps": [t.name for t in
                        taps[:max(1, math.ceil(config.priming_fraction * len(taps)))]],
        "input": {"frames": fs.frames, "size": fs.size},
        "versions": runs.library_versions(list(get_host().adapter(spec.adapter).requires)),
        "device": str(resolve_device(processes.device(config.device))), "model_seed": seed,
        "world_size": processes.world,
    }
    if resuming:
        record = {**saved, **{k: record[k] for k in ("config", "versions", "device",
                                                      "world_size")}, "status": "running"}
    created = False

    def claim_new() -> bool:
        assert run_dir is not None
        new = not run_dir.exists()
        held.append(runs.claim_run_dir(run_dir, new=True, on_warning=on_warning))
        try:
            runs.write_json(run_dir / runs.RUN_FILE, record)
        except WriteError as exc:
            runs.remove_new_run_dir(run_dir, new, held.pop())
            raise exc.with_fix(f"nothing was kept ({run_dir} is removed); free space, or pass "
                               "another --out") from None
        return new

    if run_dir is not None and not resuming:
        created = bool(on_rank0(processes, claim_new))
    elif run_dir is not None and rank0:
        runs.write_json(run_dir / runs.RUN_FILE, record)
    processes.barrier()
    return PreparedRun(
        classifier=classifier, verifier_models=verifier_models, config=config, indices=indices,
        class_names=list(class_names), groups=groups, clips=clips, mirrors=mirrors,
        record=record, run_dir=run_dir, created=created, held=held,
        batches=plan_batches(len(indices), config.samples, config.batch_size),
        files=(BatchFiles(run_dir, runs.run_identity(spec, checkpoint, reduced))
               if run_dir is not None else None), processes=processes,
        on_warning=on_warning)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` with torch's CPU generator seeded from ``seed`` (and restored after), so
    random initial weights are the same for the same seed, and a resumed run rebuilds them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _progress:
    """A rich progress bar showing the loss terms and the target probability; without a
    terminal (a log file, a pipe) plain lines instead, about one per 5% of the run."""

    def __init__(self, enabled: bool, total: int, start: int, label: str = "leaps",
                 plain: bool = False) -> None:
        self.enabled, self.total, self.start = enabled, total, start
        self.label, self.force_plain = label, plain
        self.bar: Any = None
        self.printed = start
        self.began = time.perf_counter()

    def __enter__(self) -> Callable[[int, dict[str, float]], None]:
        plain = self.enabled and (self.force_plain or not sys.stdout.isatty())
        if self.enabled and not plain:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[terms]}"),
                                transient=False)
            self.bar.start()
            self.task = self.bar.add_task("invert", total=self.total, completed=self.start,
                                          terms="")

        def update(step: int, terms: dict[str, float]) -> None:
            text = " ".join(f"{k}={v:.3g}" for k, v in terms.items() if k != "target_prob")
            text = f"{text} p(target)={terms['target_prob']:.2f}"
            if self.bar is not None:
                self.bar.update(self.task, completed=step, terms=text)
            elif plain and (step - self.printed >= self.total / 20 or step >= self.total):
                self.printed = step
                rate = (time.perf_counter() - self.began) / max(1, step - self.start)
                _line(sys.stdout, f"{self.label} {step}/{self.total} "
                      f"({step / self.total:.0%}, {rate * (self.total - step):.0f} s left) {text}")
        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
