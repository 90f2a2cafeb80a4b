"""``leaps evaluate``: measure the clips of inversion runs, per run and overall.

:func:`evaluate_runs` returns a plain, JSON-serialisable dict::

    {
      "leaps_version": "0.1.0",
      "runs": [RUN, ...],        # one per run directory, in the order given
      "overall": METRICS,        # pooled over the clips of every run (see below)
    }

    RUN = {
      "run_dir": str, "model": str, "adapter": str,
      "verifier": str | None,    # registry name; "self" when the model verified itself;
                                 # None for --verifier none
      "also": [str, ...],        # the --also models, in order
      "unseen": {name: bool},    # also-model that took no part in the optimisation (neither
                                 # the inverted model nor its verifier): transfer
      "also_adapters": {name: str},   # each also-model's adapter (its family)
      "labels": [str, ...],      # the model's classes
      "targets": [str, ...],     # target class of each clip (samples of a target in a row)
      "seed": int, "samples": int, "iterations": int,
      "preset": str, "param": str,   # the run's preset and x*'s parameterisation (leaps/params.py)
      "views": int,              # augmented views of x* per step (K)
      "seconds_per_iteration": float | None,   # None when run.json does not record the time
      "random_weights": [str, ...],   # models that judged with random weights (no checkpoint
                                      # here): their verdicts are chance, not evidence
      "metrics": METRICS,
      "clips": [CLIP, ...],
    }

    METRICS = {
      "clips": int,
      "top1_model": float,                     # fraction in [0, 1]
      "top1_verifier": float | None,           # None: no verifier, or other classes
      "top1_also": {name: float | None},       # None: that model has other classes
                                               # (overall: over the clips that have one)
      "target_prob": float,                    # mean softmax probability of the target
      "inception_score_model": {"mean", "std", "splits"} | None,
      "inception_score_verifier": {"mean", "std", "splits"} | None,
      "motion_test_model": {"accuracy": float | None, "clips": int},
      "motion_test_verifier": {"accuracy", "clips"} | None,
      "motion_test_also": {name: {"accuracy", "clips"} | None},
      "oracle": {"accuracy", "abstention", "decided_accuracy", "clips",
                 "abstained": {reason: count}} | None,
                                               # accuracy: confirmed / all clips; None unless
                                               # the classes are motion classes
      "frame_diff": float, "frame_diff_rel": float | None,   # rel: 1.0 = as real clips
      "tv": float, "tv_rel": float | None,
      "reference": "motion dataset" | "stimuli" | None,      # what "real" means for rel
      "diversity": float | None,               # mean pairwise correlation, same class
      "diversity_groups": int,                 # classes with >= 2 clips that entered it
    }

    CLIP = {"target", "sample", "model_top1", "target_prob", "verifier_top1",
            "also_top1": {name: str | None}, "reversed_model_top1", "opposite",
            "oracle", "oracle_reason", "frame_diff", "tv", "frame_diff_rel", "tv_rel"}

Overall: accuracies, target probability, the oracle and naturalness are pooled over all clips
(clip-weighted); the motion test over the clips that have an opposite; the Inception Score over
the pooled logits when every run has the same model (for the verifier: the same verifier), else
None; diversity groups clips of the same model and class across runs (different seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from leaps import metrics
from leaps.datasets import MOTION_CLASSES, make_dataset
from leaps.errors import LeapsError
from leaps.files import load_torch_file
from leaps.runs import RUN_FILE, RUN_FORMAT, expand_run_dirs

VIDEO_FILE = "video.pt"
# A run.json carrying another "format" than runs.RUN_FORMAT is refused; one without the field
# (written before it existed) must come from this very leaps version.
# Keys of run.json the evaluation needs, all written by `leaps invert`.
REQUIRED_KEYS = ("status", "model", "verifier", "reduced", "target_indices", "target_names",
                 "config", "input")
# Real clips per class the naturalness reference is measured on, and their seed (one fixed set,
# so numbers of different runs compare).
REFERENCE_CLIPS = 16
REFERENCE_SEED = 2023
BATCH = 16


@dataclass
class Run:
    """A validated run directory: its record and its synthesized clips."""

    path: Path
    record: dict[str, Any]
    video: Tensor        # [B, 3, T, H, W] in [0, 1]
    targets: list[int]   # class index per clip

    @property
    def samples(self) -> int:
        return int(self.record["config"].get("samples", 1))


def _installed_version() -> str:
    try:
        return metadata.version("leaps")
    except metadata.PackageNotFoundError:
        return "unknown"


def load_run(run_dir: str | Path) -> Run:
    """Read and validate a run directory written by ``leaps invert``.

    Every problem is a one-line :class:`LeapsError` naming it and the fix: not a directory, no
    run.json, another format or leaps version, an unfinished run, a missing or malformed
    video.pt."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a directory"
        raise LeapsError(f"{path} {what}; pass run directories written by `leaps invert`")
    record_path = path / RUN_FILE
    if not record_path.is_file():
        raise LeapsError(f"{path} is not a leaps run directory (no {RUN_FILE}); pass a "
                         "directory written by `leaps invert`")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeapsError(f"{record_path} is not valid JSON ({str(exc).splitlines()[0]}); the "
                         "run directory is damaged: re-run `leaps invert`") from None
    if not isinstance(record, dict):
        raise LeapsError(f"{record_path} is not a leaps run record (a JSON object); re-run "
                         "`leaps invert`")
    _check_format(path, record)
    _check_fields(record_path, record)
    status = record["status"]
    if status != "done":
        fix = {"running": f"the inversion is still running, or was killed: wait for it, or "
                          f"continue it with `leaps invert --resume {path}`",
               "interrupted": f"continue it with `leaps invert --resume {path}`",
               "diverged": "its loss diverged; start a new run with a lower --lr"}.get(
            status, "re-run `leaps invert`")
        raise LeapsError(f"{path} is an incomplete run (status {status!r}); {fix}")
    video_path = path / VIDEO_FILE
    if not video_path.is_file():
        raise LeapsError(f"{path} is an incomplete run: {VIDEO_FILE} is missing; re-run "
                         "`leaps invert`")
    try:
        video = load_torch_file(video_path)
    except LeapsError as exc:  # a truncated, foreign or hostile file: never loaded unsafely
        raise LeapsError(f"{video_path} cannot be read: it {exc}; re-run `leaps invert`") from None
    samples = int(record["config"].get("samples", 1))
    targets = [int(t) for t in record["target_indices"] for _ in range(samples)]
    frames, size = record["input"]["frames"], record["input"]["size"]
    expected = (len(targets), 3, frames, size, size)
    if not isinstance(video, Tensor) or tuple(video.shape) != expected:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise LeapsError(f"{video_path} holds {shape}, but run.json describes {expected} "
                         "(clips, 3, frames, size, size); the run directory is inconsistent: "
                         "re-run `leaps invert`")
    if not torch.isfinite(video).all() or video.min() < 0 or video.max() > 1:
        raise LeapsError(f"{video_path} has values outside [0, 1] (or non-finite ones); "
                         "re-run `leaps invert`")
    return Run(path, record, video.float(), targets)


def _check_format(path: Path, record: dict[str, Any]) -> None:
    installed = _installed_version()
    written_by = (record.get("versions") or {}).get("leaps")
    fmt = record.get("format")
    if fmt is not None:
        if fmt != RUN_FORMAT:
            raise LeapsError(f"{path} is a run of format {fmt} (leaps {written_by or '?'}); this "
                             f"leaps {installed} reads run format {RUN_FORMAT}: evaluate it with "
                             f"the leaps that wrote it, or re-run the inversion")
        return
    if not written_by:
        raise LeapsError(f"{path} records no leaps version or run format; it was not written "
                         "by `leaps invert`: re-run the inversion")
    if written_by != installed:
        raise LeapsError(f"{path} was written by leaps {written_by}, this is leaps {installed}: "
                         f"evaluate it with that version (pip install leaps=={written_by}) or "
                         "re-run the inversion")


def _check_fields(record_path: Path, record: dict[str, Any]) -> None:
    """The fields the evaluation reads have the types `leaps invert` writes."""
    def bad(field: str, expected: str) -> LeapsError:
        return LeapsError(f"{record_path}: {field} must be {expected}; the record is damaged: "
                          "re-run `leaps invert`")

    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise LeapsError(f"{record_path} lacks {', '.join(repr(k) for k in missing)}: it was "
                         "not written by `leaps invert` of this version; re-run the inversion")
    if not isinstance(record["config"], dict) or not isinstance(
            record["config"].get("samples", 1), int) or record["config"].get("samples", 1) < 1:
        raise bad("config", "an object whose 'samples' is a positive integer")
    sizes = record["input"]
    if not isinstance(sizes, dict) or not all(isinstance(sizes.get(k), int) and sizes[k] > 0
                                              for k in ("frames", "size")):
        raise bad("input", "an object with positive integers 'frames' and 'size'")
    indices = record["target_indices"]
    if not isinstance(indices, list) or not indices or not all(
            isinstance(i, int) and i >= 0 for i in indices):
        raise bad("target_indices", "a non-empty list of class indices")
    if not isinstance(record["model"], str):
        raise bad("model", "a registry model name")


# -- models --------------------------------------------------------------------------------


class _Models:
    """Builds each classifier once per evaluation (runs of one model share it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.random: set[str] = set()

    def get(self, name: str, checkpoint: str | None = None, labels: str | None = None,
            reduced: bool = False) -> Any:
        from leaps.registry import build_model, load_registry

        key = (name, checkpoint, labels, reduced)
        if key not in self.cache:
            self.cache[key] = build_model(name, checkpoint=checkpoint, labels=labels,
                                          reduced=reduced).to(self.device).eval()
            # build_model loads an entry's own file by default, never a URL: without either,
            # the weights are a fresh random draw and so are this model's verdicts
            if checkpoint is None and load_registry().get(name).checkpoint_path() is None:
                self.random.add(name)
        return self.cache[key]


def _run_model(run: Run, models: _Models) -> Any:
    record = run.record
    checkpoint = record.get("checkpoint")
    if checkpoint and checkpoint != "registry":  # "registry": the entry's own weights
        from leaps.adapter import checkpoint_sha256

        file = Path(checkpoint)
        if not file.exists():
            raise LeapsError(f"{run.path}: the run's checkpoint {checkpoint} is not found; run "
                             "`leaps evaluate` from the directory the inversion ran in")
        expected = record.get("checkpoint_sha256")
        from leaps.registry import load_registry

        adapter = record.get("adapter") or load_registry().get(record["model"]).adapter
        if expected and checkpoint_sha256(adapter, file) != expected:
            raise LeapsError(f"{run.path}: checkpoint {checkpoint} changed since the run "
                             "(sha256 differs); restore the weights the run used")
    try:
        from leaps.model_files import restore_model

        # a model given by its config file or a --registry file is registered again first
        return models.get(restore_model(record, run.path), checkpoint, record.get("labels"),
                          bool(record["reduced"]))
    except LeapsError as exc:
        raise LeapsError(f"{run.path}: {exc}") from None


@torch.no_grad()
def _logits(classifier: Any, video: Tensor, device: torch.device) -> Tensor:
    spec = classifier.spec
    out = []
    for chunk in video.split(BATCH):
        clip = metrics.resize_clips(chunk.to(device), spec.frames, spec.size)
        out.append(classifier(clip).float().cpu())
    return torch.cat(out)


# -- one run -------------------------------------------------------------------------------


def _reference(labels: Sequence[str], frames: int, size: int, run: Run,
               cache: dict[tuple[int, int], dict[str, dict[str, float]]]
               ) -> tuple[str | None, dict[str, dict[str, float]]]:
    """Per-class mean frame difference and total variation of real clips of the run's size:
    clips of the motion dataset when the classes are motion classes, else the run's stimuli."""
    if set(labels) <= set(MOTION_CLASSES):
        if (frames, size) not in cache:
            videos, classes, _ = make_dataset(REFERENCE_CLIPS, frames, size, REFERENCE_SEED)
            names = [MOTION_CLASSES[i] for i in classes.tolist()]
            cache[(frames, size)] = {
                "frame_diff": metrics.per_class_mean(metrics.frame_difference(videos), names),
                "tv": metrics.per_class_mean(metrics.total_variation(videos), names)}
        return "motion dataset", cache[(frames, size)]
    from leaps.video import read_clips

    groups = run.record.get("stimuli") or []
    names = run.record["target_names"]
    if len(groups) != len(names) or not all(groups) or \
            not all(Path(p).exists() for group in groups for p in group):
        return None, {}
    values: dict[str, dict[str, float]] = {"frame_diff": {}, "tv": {}}
    for name, group in zip(names, groups):
        clips = read_clips(group, frames, size)
        values["frame_diff"][name] = float(metrics.frame_difference(clips).mean())
        values["tv"][name] = float(metrics.total_variation(clips).mean())
    return "stimuli", values


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _is_dict(score: metrics.InceptionScore | None) -> dict[str, Any] | None:
    return metrics.as_dict(score) if score is not None else None


def _evaluate_run(run: Run, also: Sequence[str], models: _Models,
                  references: dict[tuple[int, int], dict[str, dict[str, float]]]
                  ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from leaps.registry import load_registry

    record, video, device = run.record, run.video, models.device
    registry = load_registry()
    model = _run_model(run, models)
    labels = list(model.labels)
    targets = torch.tensor(run.targets)
    if targets.max() >= len(labels):
        raise LeapsError(f"{run.path}: a target index exceeds the model's {len(labels)} classes; "
                         "the run does not belong to this model: re-run the inversion")
    names = [labels[t] for t in run.targets]
    spec = registry.get(record["model"])
    opposite = metrics.opposite_indices(labels, spec.opposites)

    logits = _logits(model, video, device)
    reversed_logits = _logits(model, metrics.reverse_in_time(video), device)
    verifier_name = record["verifier"]
    verifier = None
    if verifier_name == "self":
        verifier = model
    elif verifier_name not in (None, "none"):
        try:
            verifier = models.get(verifier_name, record.get("verifier_checkpoint"),
                                  reduced=bool(record["reduced"]))
        except LeapsError as exc:
            raise LeapsError(f"{run.path}: its verifier cannot be built: {exc}") from None
    same_classes = verifier is not None and list(verifier.labels) == labels
    v_logits = _logits(verifier, video, device) if same_classes else None
    v_reversed = _logits(verifier, metrics.reverse_in_time(video), device) if same_classes else None

    took_part = {record["model"], verifier_name}
    also_logits: dict[str, tuple[Tensor, Tensor] | None] = {}
    unseen: dict[str, bool] = {}
    for name in also:
        other = models.get(name, reduced=bool(record["reduced"]))
        unseen[name] = name not in took_part
        also_logits[name] = ((_logits(other, video, device),
                              _logits(other, metrics.reverse_in_time(video), device))
                             if list(other.labels) == labels else None)

    probs = metrics.target_probability(logits, targets)
    frame_diff = metrics.frame_difference(video)
    tv = metrics.total_variation(video)
    frames, size = video.shape[2], video.shape[3]
    reference, ref = _reference(labels, frames, size, run, references)
    diff_rel = metrics.relative_to_reference(frame_diff, names, ref.get("frame_diff", {}))
    tv_rel = metrics.relative_to_reference(tv, names, ref.get("tv", {}))
    motion_set = set(labels) <= set(MOTION_CLASSES)
    verdicts = [metrics.motion_oracle(clip, classes=labels) for clip in video] \
        if motion_set else None

    clips = []
    for i, target in enumerate(run.targets):
        clips.append({
            "target": names[i], "sample": i % run.samples,
            "model_top1": labels[int(logits[i].argmax())],
            "target_prob": float(probs[i]),
            "verifier_top1": labels[int(v_logits[i].argmax())] if v_logits is not None else None,
            "also_top1": {n: labels[int(pair[0][i].argmax())] if pair is not None else None
                          for n, pair in also_logits.items()},
            "reversed_model_top1": labels[int(reversed_logits[i].argmax())],
            "opposite": labels[opposite[target]] if target in opposite else None,
            "oracle": verdicts[i].label if verdicts else None,
            "oracle_reason": verdicts[i].reason if verdicts else None,
            "frame_diff": float(frame_diff[i]), "tv": float(tv[i]),
            "frame_diff_rel": diff_rel[i], "tv_rel": tv_rel[i],
        })
    tensors = {"logits": logits}
    if v_logits is not None:
        tensors["verifier_logits"] = v_logits
    steps = int(record.get("steps") or 0)
    elapsed = record.get("elapsed_s")
    result = {
        "run_dir": str(run.path), "model": record["model"], "adapter": spec.adapter,
        "verifier": None if verifier_name in (None, "none") else verifier_name,
        "also": list(also), "unseen": unseen,
        "also_adapters": {name: registry.get(name).adapter for name in also},
        "labels": labels, "targets": names,
        "seed": int(record["config"].get("seed", 0)), "samples": run.samples,
        "iterations": steps,
        # Runs from before x* had parameterisations: the paper's pixels, one view.
        "preset": str(record["config"].get("preset", "paper")),
        "param": str(record["config"].get("param", "pixels")),
        "views": int(record["config"].get("views", 1)),
        "seconds_per_iteration": (float(elapsed) / steps if elapsed is not None and steps
                                  else None),
        "random_weights": sorted(models.random & ({record["model"], verifier_name} | set(also))),
        "clips": clips,
    }
    result["metrics"] = _summarise(
        clips, [video], [names], logits, v_logits, reference,
        motion={"model": metrics.motion_test(reversed_logits, targets, opposite),
                "verifier": (metrics.motion_test(v_reversed, targets, opposite)
                             if v_reversed is not None else None),
                **{f"also:{n}": metrics.motion_test(p[1], targets, opposite) if p else None
                   for n, p in also_logits.items()}},
        also=list(also))
    return result, tensors


def _summarise(clips: list[dict[str, Any]],
               videos: list[Tensor], names: list[list[str]], logits: Tensor | None,
               v_logits: Tensor | None, reference: str | None,
               motion: dict[str, tuple[float | None, int] | None], also: list[str]
               ) -> dict[str, Any]:
    """METRICS (see the module docstring) from per-clip records and pooled tensors."""
    n = len(clips)

    def share(key: str, sub: str | None = None) -> float | None:
        # over the clips that have a verdict: pooled runs may mix models with and without
        # a verifier (or with other classes than an --also model)
        pairs = [((c[key][sub] if sub else c[key]), c["target"]) for c in clips]
        pairs = [(v, t) for v, t in pairs if v is not None]
        return sum(v == t for v, t in pairs) / len(pairs) if pairs else None

    def motion_dict(value: tuple[float | None, int] | None) -> dict[str, Any] | None:
        return None if value is None else {"accuracy": value[0], "clips": value[1]}

    oracle = None
    if all(c["oracle_reason"] is not None for c in clips):
        decided = [c for c in clips if c["oracle"] is not None]
        correct = sum(c["oracle"] == c["target"] for c in decided)
        reasons: dict[str, int] = {}
        for c in clips:
            if c["oracle"] is None:
                reasons[c["oracle_reason"]] = reasons.get(c["oracle_reason"], 0) + 1
        oracle = {"accuracy": correct / n, "abstention": 1 - len(decided) / n,
                  "decided_accuracy": correct / len(decided) if decided else None,
                  "clips": n, "abstained": dict(sorted(reasons.items()))}
    correlations = []
    for video, group_names in zip(videos, names):
        value, groups = metrics.diversity(video, group_names)
        if value is not None:
            correlations.append((value, groups))
    groups = sum(g for _, g in correlations)
    return {
        "clips": n,
        "top1_model": share("model_top1"),
        "top1_verifier": share("verifier_top1"),
        "top1_also": {name: share("also_top1", name) for name in also},
        "target_prob": sum(c["target_prob"] for c in clips) / n,
        "inception_score_model": (_is_dict(metrics.inception_score(logits))
                                  if logits is not None else None),
        "inception_score_verifier": (_is_dict(metrics.inception_score(v_logits))
                                     if v_logits is not None else None),
        "motion_test_model": motion_dict(motion["model"]),
        "motion_test_verifier": motion_dict(motion["verifier"]),
        "motion_test_also": {name: motion_dict(motion[f"also:{name}"]) for name in also},
        "oracle": oracle,
        "frame_diff": sum(c["frame_diff"] for c in clips) / n,
        "frame_diff_rel": _mean([c["frame_diff_rel"] for c in clips]),
        "tv": sum(c["tv"] for c in clips) / n,
        "tv_rel": _mean([c["tv_rel"] for c in clips]),
        "reference": reference,
        "diversity": (sum(v * g for v, g in correlations) / groups) if groups else None,
        "diversity_groups": groups,
    }


def _pool_motion(runs: list[dict[str, Any]], key: str, name: str | None = None
                 ) -> tuple[float | None, int] | None:
    """Clip-weighted motion test over runs (None when a run lacks it)."""
    parts = [r["metrics"][key] if name is None else r["metrics"][key].get(name) for r in runs]
    if any(p is None for p in parts):
        return None
    counted = [(p["accuracy"], p["clips"]) for p in parts if p["clips"]]
    total = sum(c for _, c in counted)
    return (sum(a * c for a, c in counted) / total if total else None), total


def _overall(results: list[dict[str, Any]], loaded: list[Run],
             tensors: list[dict[str, Tensor]], also: list[str]) -> dict[str, Any]:
    clips = [c for r in results for c in r["clips"]]
    same_model = len({r["model"] for r in results}) == 1
    # "self" is the same verifier only for the same model
    same_verifier = len({(r["verifier"], r["model"] if r["verifier"] == "self" else None)
                         for r in results}) == 1 and all("verifier_logits" in t for t in tensors)
    logits = torch.cat([t["logits"] for t in tensors]) if same_model else None
    v_logits = torch.cat([t["verifier_logits"] for t in tensors]) if same_verifier else None
    references = {r["metrics"]["reference"] for r in results}
    # Diversity across runs: clips of one model and class, whatever run (seed) they came from.
    by_key: dict[tuple[str, tuple[int, ...]], list[tuple[Tensor, list[str]]]] = {}
    for result, run in zip(results, loaded):
        by_key.setdefault((result["model"], tuple(run.video.shape[1:])), []).append(
            (run.video, result["targets"]))
    videos = [torch.cat([v for v, _ in group]) for group in by_key.values()]
    names = [[n for _, ns in group for n in ns] for group in by_key.values()]
    motion = {"model": _pool_motion(results, "motion_test_model"),
              "verifier": _pool_motion(results, "motion_test_verifier"),
              **{f"also:{n}": _pool_motion(results, "motion_test_also", n) for n in also}}
    return _summarise(clips, videos, names, logits, v_logits,
                      references.pop() if len(references) == 1 else None, motion, also)


def evaluate_runs(run_dirs: Sequence[str | Path], also: Sequence[str] = (),
                  device: str = "cpu") -> dict[str, Any]:
    """Evaluate the synthesized clips of inversion runs (see the module docstring for the keys).

    ``also`` names registry models that judge the clips besides the inverted model and its
    verifier (transfer to models that took no part in the optimisation, ideally of another
    family). Every run directory is validated before any model is
    built; a bad one raises a one-line :class:`LeapsError`."""
    from leaps.invert import resolve_device
    from leaps.registry import load_registry

    if not run_dirs:
        raise LeapsError("name at least one run directory (written by `leaps invert`)")
    run_dirs = expand_run_dirs(run_dirs)
    loaded = [load_run(path) for path in run_dirs]
    registry = load_registry()
    for name in also:
        registry.get(name)  # an unknown name fails now, with close matches
    models = _Models(resolve_device(device))
    references: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    results, tensors = [], []
    for run in loaded:
        result, extra = _evaluate_run(run, also, models, references)
        results.append(result)
        tensors.append(extra)
    for name in also:
        if all(r["metrics"]["top1_also"][name] is None for r in results):
            raise LeapsError(f"--also model {name!r} classifies other classes than the runs' "
                             "models; pick a model with the same label set")
    return {"leaps_version": _installed_version(), "runs": results,
            "overall": _overall(results, loaded, tensors, list(also))}


# -- presentation ----------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _is_text(score: dict[str, Any] | None) -> str:
    return "-" if score is None else f"{score['mean']:.2f} ± {score['std']:.2f}"


def _motion_text(test: dict[str, Any] | None) -> str:
    return "-" if test is None or test["accuracy"] is None else _pct(test["accuracy"])


LEGEND = (
    "x* (views): how the synthesized clips were parameterised (pixels, spectrum, warp) and how "
    "many augmented views of them each optimisation step averaged. top-1: share of clips "
    "classified as their target, by the inverted model, its verifier, "
    "and each --also model (unseen: it took no part in the optimisation; seen: it is the "
    "inverted model or its verifier). IS: Inception Score, mean ± std over splits. "
    "Motion test: share of clips that, reversed in time, are classified (by the model) as the "
    "opposite class. Oracle: share of clips a non-neural motion estimator confirms as the "
    "target motion, and the share where it abstained. Frame diff and TV: mean absolute "
    "frame-to-frame difference and spatial total variation relative to real clips of the same "
    "class (1.0 = as real). Diversity: mean pairwise correlation between clips of one class "
    "(lower = more diverse). p(target): mean softmax probability of the target.")


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The evaluation as text cells: ``(header, rows)``, one row per run and, for several runs,
    one for all of them. Every output (terminal, Markdown, HTML report) shows these cells."""
    also = list(dict.fromkeys(n for r in result["runs"] for n in r["also"]))
    header = ["run", "model", "x* (views)", "clips", "top-1 model", "top-1 verifier",
              *[f"top-1 {name}" for name in also], "IS model", "IS verifier", "motion test",
              "oracle (abstained)", "frame diff ×real", "TV ×real", "diversity", "p(target)",
              "iterations", "s/it"]
    entries = [(Path(r["run_dir"]).name, r["model"], r["metrics"], r) for r in result["runs"]]
    if len(result["runs"]) > 1:
        entries.append(("all runs", "", result["overall"], None))
    rows = []
    for name, model, m, run in entries:
        transfer = []
        for other in also:
            value = _pct(m["top1_also"].get(other))
            if run is not None and value != "-":
                value += " (unseen)" if run["unseen"].get(other) else " (seen)"
            transfer.append(value)
        oracle = m["oracle"]
        rows.append([
            name, model,
            f"{run.get('param', 'pixels')} ({run.get('views', 1)})" if run else "",
            str(m["clips"]),
            _pct(m["top1_model"]), _pct(m["top1_verifier"]),
            *transfer,
            _is_text(m["inception_score_model"]), _is_text(m["inception_score_verifier"]),
            _motion_text(m["motion_test_model"]),
            f"{_pct(oracle['accuracy'])} ({_pct(oracle['abstention'])})" if oracle else "-",
            _num(m["frame_diff_rel"]), _num(m["tv_rel"]), _num(m["diversity"]),
            _num(m["target_prob"]),
            str(run["iterations"]) if run else "",
            _num(run["seconds_per_iteration"], 3) if run else "",
        ])
    return header, rows


def to_markdown(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table (one row per run) with a legend."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    header, rows = table(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(["# leaps evaluation", "", *lines, "", LEGEND, ""])


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """Print the evaluation as a rich table on ``console`` (default stdout): one column per run
    (and one for all runs), one row per measure, so many measures fit a terminal."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table(result)
    grid = Table(title="leaps evaluate", title_justify="left")
    grid.add_column("")
    for row in rows:
        grid.add_column(f"{row[0]}\n{row[1]}" if row[1] else row[0], overflow="fold")
    for i, name in enumerate(header[2:], start=2):
        grid.add_row(name, *[row[i] for row in rows])
    (console or Console()).print(grid)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (temp file + rename)."""
    from leaps.video import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="RUN_DIR...")
@click.option("--also", "also", multiple=True, metavar="MODEL",
              help="Another registry model that judges the clips (transfer: pick one that "
                   "took no part in the optimisation, of another family); repeat for several.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full evaluation as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table as Markdown here.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or auto.")
def evaluate(run_dirs: tuple[Path, ...], also: tuple[str, ...], json_path: Path | None,
             markdown_path: Path | None, device: str) -> None:
    """Measure the synthesized clips of inversion runs (a `leaps sweep` directory: all of its
    runs): top-1 by the model, its verifier and
    unseen models, Inception Score, motion test, motion oracle, naturalness, diversity."""
    from leaps.files import check_output_file

    for option, path in (("--json", json_path), ("--markdown", markdown_path)):
        if path is not None:
            check_output_file(path, option)
    result = evaluate_runs(run_dirs, also, device)
    print_table(result)
    click.echo(LEGEND)
    unweighted = sorted({name for run in result["runs"] for name in run["random_weights"]})
    if unweighted:
        click.echo(f"warning: {', '.join(unweighted)} had no weights here (random "
                   "initialisation): their top-1, IS and motion test are chance; give the "
                   "runs' models trained weights", err=True)
    if json_path is not None:
        from leaps.runs import strict_json

        write_text(json_path, strict_json(result))
        click.echo(f"wrote {json_path}")
    if markdown_path is not None:
        write_text(markdown_path, to_markdown(result))
        click.echo(f"wrote {markdown_path}")
