"""Run directories: one per inversion, everything needed to look at and reproduce it.

    run.json     adapter, model, checkpoint sha256, every option, seed, library versions,
                 stimuli, targets, loss history per term, final metrics, status
    state.pt     the resumable optimisation state (while running / when interrupted)
    video.pt     the synthesized clips [B, 3, T, H, W] in [0, 1]
    sample_<i>_<class>.gif / .mp4, the synthesized clips
    stimulus_<j>_<class>.gif     the first stimulus of each target, as the model saw it
    grid.png (stimulus rows + samples x frames), loss.png

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leaps.errors import LeapsError
from leaps.invert import TERMS, InversionState
from leaps.video import atomic_path, save_tensor, write_gif, write_grid_png, write_mp4

RUN_FILE = "run.json"
# The layout of run.json and the run directory; readers refuse other formats.
RUN_FORMAT = 1
STATE_FILE = "state.pt"


def library_versions(extra_modules: list[str] = ()) -> dict[str, str]:
    """Versions of the libraries a run depended on."""
    names = ["leaps", "torch", "torchvision", "numpy", "av"]
    mapping = metadata.packages_distributions()
    for module in extra_modules:
        names.extend(mapping.get(module.split(".")[0], []))
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys(names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise LeapsError(f"{run_dir} is not a leaps run directory (no {RUN_FILE}); pass the "
                         "directory an earlier `leaps invert` wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LeapsError(f"{path} is not valid JSON ({exc}); the run cannot be resumed") from None


def create_run_dir(path: Path) -> Path:
    """Create a new, empty run directory; never reuse an existing one silently."""
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise LeapsError(f"output directory {path} already exists; pass another --out, or "
                         f"--resume {path} to continue that run")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_state(run_dir: Path, state: InversionState) -> None:
    with atomic_path(run_dir / STATE_FILE) as tmp:
        torch.save({"step": state.step, "video": state.video.detach().cpu(),
                    "optimizer": _to_cpu(state.optimizer), "scheduler": state.scheduler,
                    "rng": state.rng, "history": state.history}, tmp)


def load_state(run_dir: Path) -> InversionState:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise LeapsError(f"{run_dir} has no {STATE_FILE} to resume from (the run finished or "
                         "never saved); start a new run")
    data = torch.load(path, map_location="cpu", weights_only=True)
    rng = data["rng"]
    rng = (rng[0], tuple(rng[1]), rng[2])  # random.Random.setstate wants the inner tuple back
    return InversionState(data["step"], data["video"], data["optimizer"], data["scheduler"], rng,
                          {term: list(data["history"].get(term, [])) for term in TERMS})


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def write_outputs(run_dir: Path, video: Tensor, stimuli: list[Tensor], labels: list[str],
                  history: dict[str, list[float]]) -> list[str]:
    """Write the synthesized clips (tensor, GIF, MP4), the frame grid and the loss curves."""
    video = video.detach().cpu().float()
    written = ["video.pt"]
    save_tensor(video, run_dir / "video.pt")
    for i, (clip, label) in enumerate(zip(video, labels)):
        stem = f"sample_{i}_{slug(label)}"
        write_gif(clip, run_dir / f"{stem}.gif")
        write_mp4(clip, run_dir / f"{stem}.mp4")
        written += [f"{stem}.gif", f"{stem}.mp4"]
    stimulus_labels = list(dict.fromkeys(labels))[:len(stimuli)]
    for j, (clip, label) in enumerate(zip(stimuli, stimulus_labels)):
        stem = f"stimulus_{j}_{slug(label)}"
        write_gif(clip.detach().cpu().float(), run_dir / f"{stem}.gif")
        written.append(f"{stem}.gif")
    rows = [s.detach().cpu().float() for s in stimuli] + list(video)
    row_labels = [f"stimulus: {lab}" for lab in stimulus_labels] + \
        [f"leaps: {lab}" for lab in labels]
    write_grid_png(rows, run_dir / "grid.png", row_labels=row_labels)
    written.append("grid.png")
    if history.get("total"):
        write_loss_curves(history, run_dir / "loss.png")
        written.append("loss.png")
    return written


def write_loss_curves(history: dict[str, list[float]], path: Path) -> None:
    """One panel per loss term over the iterations (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    terms = [t for t in TERMS if history.get(t)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3 * len(terms), 2.6), squeeze=False)
    for ax, term in zip(axes[0], terms):
        ax.plot(range(1, len(history[term]) + 1), history[term], linewidth=1)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def default_run_dir(model: str, root: str | os.PathLike[str] = "runs") -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{slug(model)}"
