"""Run directories: one per inversion, everything needed to look at and reproduce it.

    run.json     adapter, model, checkpoint sha256, every option, seed, library versions,
                 stimuli, targets, loss history per term, final metrics, status
    batches/     each batch's resumable state and, once finished, its clips (leaps.batches);
                 removed when the run's outputs are all written
    video.pt     the synthesized clips [B, 3, T, H, W] in [0, 1]
    sample_<i>_<class>.gif / .mp4, the synthesized clips
    stimulus_<j>_<class>.gif     the first stimulus of each target, as the model saw it
    grid.png (stimulus rows + samples x frames), loss.png

Every file is written atomically (temp file + rename), through leaps.files (a refused write is
one line naming the file); one process at a time writes a run directory (its lock file), or
under torchrun one run (rank 0 holds the lock, every rank writes its own batches' files).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leaps.errors import LeapsError
from leaps.files import (
    WriteError,
    check_output_dir,
    load_torch_file,
    write_bytes,
    write_text,
)
from leaps.invert import TERMS, InversionState
from leaps.video import atomic_path, save_tensor, write_gif, write_grid_png, write_mp4

RUN_FILE = "run.json"
# The layout of run.json and the run directory; readers refuse other formats.
RUN_FORMAT = 1
# Held (flock) by the one process writing the run; it holds that process's pid.
LOCK_FILE = ".lock"


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
    """Write ``data`` as :func:`strict_json`."""
    write_text(path, strict_json(data))


def strict_json(data: Any) -> str:
    """``data`` as strict JSON text: a non-finite number (a diverged loss, an undefined
    metric) is written as null, never as the ``NaN`` other JSON readers reject."""
    return json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# What --resume reads from run.json.
_RESUME_KEYS = ("model", "targets", "stimuli", "verifier", "checkpoint", "labels", "reduced",
                "config", "target_indices", "status")


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run.json of ``run_dir`` for ``--resume``: of this leaps' run format, with every
    field a resume reads; anything else is a LeapsError naming the file and what is wrong."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise LeapsError(f"{run_dir} is not a leaps run directory (no {RUN_FILE}); pass the "
                         "directory an earlier `leaps invert` wrote")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise LeapsError(f"{path} is not valid JSON ({first}); the run cannot be resumed: "
                         "restore the file, or start a new run with another --out") from None
    except OSError as exc:
        raise LeapsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(record, dict):
        raise LeapsError(f"{path} is not a leaps run record (a JSON object); the run cannot be "
                         "resumed: start a new run with another --out")
    fmt = record.get("format")
    if fmt != RUN_FORMAT:
        what = "records no run format" if fmt is None else f"is of run format {fmt!r}"
        raise LeapsError(f"{path} {what}; this leaps reads run format {RUN_FORMAT} (it was "
                         "written by another leaps version, or edited): the run cannot be "
                         "resumed here; start a new run with another --out")
    missing = [key for key in _RESUME_KEYS if key not in record]
    if missing:
        raise LeapsError(f"{path} lacks {', '.join(map(repr, missing))} (edited or damaged); "
                         "the run cannot be resumed: restore the file, or start a new run with "
                         "another --out")
    return record


def expand_run_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run directories from the paths given: a run directory is itself; a folder that holds
    none itself but run directories below it (a `leaps sweep` directory) is those, in name
    order; anything else is kept (the reader names what is wrong with it)."""
    expanded: list[Path] = []
    for given in paths:
        path = Path(given)
        below = sorted(p.parent for p in path.glob(f"*/{RUN_FILE}")) \
            if path.is_dir() and not (path / RUN_FILE).exists() else []
        expanded.extend(below or [path])
    return expanded


def check_new_run_dir(path: Path) -> None:
    """Before any work: ``path`` can become a new run directory (it does not exist or is an
    empty folder, under a folder that can be written)."""
    in_use = _holder(path)
    if in_use is not None:
        raise LeapsError(_in_use_message(path, in_use))
    if path.is_dir() and any(path.iterdir()):
        raise LeapsError(f"output directory {path} already exists and is not empty; "
                         f"{_existing_hint(path)}")
    check_output_dir(path)


def _existing_hint(path: Path) -> str:
    """What to do about an existing directory: resume only where it can be resumed."""
    if (path / RUN_FILE).is_file():
        try:
            finished = read_run(path).get("status") == "done"
        except LeapsError:
            return "it holds a damaged run.json; pass another --out"
        if finished:
            return "it holds a finished run; pass another --out"
        return f"pass another --out, or `--resume {path}` to continue that run"
    return "pass another --out (or a new or empty folder)"


def stopped_state(run_dir: Path) -> str:
    """What an interrupted ``leaps invert`` left in ``run_dir``, and what to do: only what is
    true (nothing, a run that starts over, or saved steps to continue from)."""
    from leaps.batches import BATCH_DIR

    if not (run_dir / RUN_FILE).is_file():
        return "the run had not started: nothing was written"
    batches = run_dir / BATCH_DIR
    if batches.is_dir() and any(batches.glob("batch_*.pt")):
        return f"the state is saved: continue with `leaps invert --resume {run_dir}`"
    return (f"no step was saved yet: `leaps invert --resume {run_dir}` starts the run from its "
            "first step")


class RunLock:
    """A run directory claimed by this process: an exclusive ``flock`` on its lock file, held
    until :meth:`release` (or until the process dies, when the kernel drops it, so a crashed
    run never blocks its ``--resume``). The file holds the owner's pid for the message other
    writers get."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        if self.handle is None:
            return
        # Unlink first, then unlock: a writer waiting on this inode sees it gone and retries.
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        self.handle.close()
        self.handle = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_dir(path: Path, new: bool,
                  on_warning: Callable[[str], None] | None = None) -> RunLock:
    """Claim ``path`` for one writer: a second ``leaps invert`` on the same directory (a new
    run, or a ``--resume``) gets a LeapsError naming the process that holds it.

    ``new``: create the directory (or take an empty one) for a new run; it must not hold
    anything else once claimed (two runs started at once: exactly one gets it). A lock file
    left by a process that is gone (killed, crashed) is taken over, with a warning."""
    made = new and not path.exists()
    if new:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WriteError(path, error) from None
    try:
        return _lock(path, new, on_warning)
    except WriteError:
        if made:  # a failed first write leaves nothing behind
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        raise


def _lock(path: Path, new: bool, on_warning: Callable[[str], None] | None) -> RunLock:
    import fcntl

    lock_path = path / LOCK_FILE
    while True:
        try:
            handle = open(lock_path, "a+", encoding="utf-8")
        except OSError as error:
            raise WriteError(lock_path, error) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for _ in range(20):  # the holder writes its pid right after taking the lock
                handle.seek(0)
                pid = handle.read().strip()
                if pid:
                    break
                time.sleep(0.05)
            handle.close()
            raise LeapsError(_in_use_message(path, int(pid) if pid.isdigit() else None)) \
                from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the previous holder released (and unlinked) it meanwhile: retry
    handle.seek(0)
    previous = handle.read().strip()
    if previous.isdigit() and int(previous) != os.getpid() and on_warning is not None:
        on_warning(f"run directory {path} was locked by process {previous}, which is no longer "
                   "running (killed or crashed); taking it over")
    lock = RunLock(path, handle)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError as error:
        lock.release()
        raise WriteError(lock_path, error) from None
    if new and any(p.name != LOCK_FILE for p in path.iterdir()):
        lock.release()
        raise LeapsError(f"output directory {path} already exists and is not empty; "
                         f"{_existing_hint(path)}")
    return lock


def _holder(path: Path) -> int | None:
    """The live process named by ``path``'s lock file, if any (a look only: the claim itself
    is :func:`claim_run_dir`'s flock)."""
    try:
        pid = (path / LOCK_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return int(pid)


def _in_use_message(path: Path, pid: int | None) -> str:
    holder = f"process {pid}" if pid is not None else "another process"
    return (f"run directory {path} is in use by {holder}; wait for it to finish (or stop it), "
            "or pass another --out")


def remove_new_run_dir(path: Path, created: bool, lock: RunLock) -> None:
    """Undo a new run that could not write anything worth keeping: its files (all of them are
    this run's: the directory was new or empty) and the directory if this run created it."""
    import shutil

    lock.release()
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# The options of `leaps invert` that name what a run is; `--resume` keeps the run's own.
_RUN_IDENTITY = {"model": "--model", "adapter": "--adapter", "targets": "--target",
                 "stimuli": "--stimulus", "verifier": "--verifier",
                 "checkpoint": "--checkpoint", "labels": "--labels", "reduced": "--reduced",
                 "verifier_checkpoint": "--verifier-checkpoint",
                 "model_config": "--config", "frames": "--frames", "size": "--size"}


def check_resume_arguments(saved: dict[str, Any], **given: Any) -> None:
    """Refuse run-defining options given with ``--resume`` that differ from the run's (the
    same value is accepted: it changes nothing)."""
    for name, value in given.items():
        if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
            continue
        option = _RUN_IDENTITY[name]
        if name == "targets":
            same = [str(v) for v in value] == list(saved.get("targets") or [])
            shown = " ".join(str(v) for v in value)
            theirs = " ".join(saved.get("targets") or [])
        elif name == "stimuli":
            groups = saved.get("stimuli") or []
            same = [str(v) for v in value] == [p for group in groups for p in group]
            shown, theirs = " ".join(map(str, value)), " ".join(p for g in groups for p in g)
        elif name == "verifier":
            names = [value] if isinstance(value, str) else list(value)
            same = names == (saved.get("verifiers") or [saved.get("verifier")])
            shown = " ".join(names)
            theirs = " ".join(saved.get("verifiers") or [saved.get("verifier") or ""])
        elif name == "adapter":
            forced = (saved.get("model_config") or {}).get("adapter")
            same = value in (saved.get("adapter"), forced)
            shown, theirs = value, saved.get("adapter")
        elif name in ("model_config", "frames", "size"):
            # What the model was built from is checked where it is rebuilt (its sha256).
            recorded = saved.get("model_config") or {}
            theirs = recorded.get("given") if name == "model_config" else recorded.get(name)
            if name != "model_config" and theirs is None:
                theirs = (saved.get("input") or {}).get(name)
            same = str(value) == str(theirs) or (
                name == "model_config" and recorded.get("path") is not None
                and Path(str(value)).resolve() == Path(recorded["path"]))
            shown = value
        else:
            same = (str(value) if name != "reduced" else value) == saved.get(name)
            shown, theirs = value, saved.get(name)
        if not same:
            raise LeapsError(f"{option} {shown} conflicts with the run being resumed ({option[2:]} "
                             f"{theirs or 'not set'}): --resume continues a run with its own "
                             f"model, targets and options; drop {option}, or start a new run "
                             "with --out")


# The layout of a saved optimisation state (batches/batch_<i>.state.pt); readers refuse others.
STATE_FORMAT = 1


def write_state(path: Path, state: InversionState, identity: dict[str, Any] | None = None
                ) -> None:
    """Write a resumable state atomically, with its format and the ``identity`` of the model
    that made it (:func:`run_identity`). It is serialised in memory first, so a full disk is a
    WriteError naming the file and the previous state stays as it was."""
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "identity": identity, "step": state.step,
                "param": state.param.detach().cpu(),
                "optimizer": _to_cpu(state.optimizer), "scheduler": state.scheduler,
                "rng": state.rng, "history": state.history}, buffer)
    write_bytes(path, buffer.getvalue())


class StateError(LeapsError):
    """A saved state that a run cannot continue from; the message says what is wrong with it
    (the caller adds what to do)."""


class IdentityError(StateError):
    """A saved state or batch result made by another model or checkpoint than the run's."""


def read_state(path: Path, identity: dict[str, Any] | None = None) -> InversionState:
    """A state :func:`write_state` wrote: of this format, whole, and (given ``identity``) made
    by that model and checkpoint; else a :class:`StateError` naming the file and the problem.
    The file is loaded without unpickling code (:func:`leaps.files.load_torch_file`)."""
    try:
        data = load_torch_file(path)
    except LeapsError as exc:
        raise StateError(f"{path} {exc}") from None
    if not isinstance(data, dict):
        raise StateError(f"{path} is not a leaps optimisation state (it holds "
                         f"{type(data).__name__})")
    fmt = data.get("format")
    if fmt != STATE_FORMAT:
        what = "records no state format" if fmt is None else f"is of state format {fmt!r}"
        raise StateError(f"{path} {what}, this leaps reads state format {STATE_FORMAT} "
                         "(written by another leaps version?)")
    # "video": states written before x* had parameterisations (pixels, the only one then)
    video = data.get("param", data.get("video"))
    kinds = {"step": int, "optimizer": dict, "scheduler": dict, "rng": (tuple, list),
             "history": dict}
    missing = [k for k in ("step", "optimizer", "scheduler", "rng", "history") if k not in data]
    if video is None:
        missing.insert(1, "param")
    wrong = [k for k, kind in kinds.items() if k in data and not isinstance(data[k], kind)]
    if missing or wrong or not isinstance(video, Tensor):
        problem = (f"lacks {', '.join(map(repr, missing))}" if missing else
                   f"has an invalid {', '.join(map(repr, wrong or ['param']))}")
        raise StateError(f"{path} {problem} (damaged or edited)")
    if identity is not None:
        check_identity(path, data.get("identity"), identity)
    try:
        rng = data["rng"]
        rng = (rng[0], tuple(rng[1]), rng[2])  # random.Random.setstate wants the inner tuple
    except (IndexError, TypeError):
        raise StateError(f"{path} has an invalid 'rng' (damaged or edited)") from None
    return InversionState(data["step"], video, data["optimizer"], data["scheduler"], rng,
                          {term: list(data["history"].get(term, [])) for term in TERMS})


def run_identity(spec: Any, checkpoint: str | Path | None, reduced: bool) -> dict[str, Any]:
    """What makes a run's model the one it is: adapter, registry entry, architecture arguments
    (at the size built) and the sha256 of the weights (None: random weights from the seed).
    Saved with every state and batch result, compared on ``--resume``."""
    arch = spec.at_reduced_size().arch if reduced else spec.arch
    weights: str | None = None
    if checkpoint == "registry" or (checkpoint is None and spec.checkpoint is not None
                                    and spec.checkpoint_path() is not None):
        path = spec.checkpoint_path()
        # A downloaded checkpoint is checked against the registry's sha256 when fetched.
        weights = (_cached_sha256(str(path)) if path is not None and path.is_file()
                   else f"registry:{spec.checkpoint.sha256}")
    elif checkpoint:
        weights = f"missing:{checkpoint}"
        if Path(str(checkpoint)).exists():
            from leaps.plugins import get_host

            try:  # inside a folder checkpoint: the weights file the adapter loads
                file = get_host().adapter(spec.adapter)().checkpoint_file(checkpoint)
                weights = _cached_sha256(str(file))
            except LeapsError:
                pass
    return {"adapter": spec.adapter, "model": spec.name, "arch": arch, "reduced": bool(reduced),
            "weights_sha256": weights}


def resume_identity(saved: dict[str, Any]) -> dict[str, Any]:
    """The :func:`run_identity` of the run a run.json describes, as it would be built now; a
    checkpoint file whose sha256 is not the one the run recorded is a LeapsError."""
    from leaps.registry import load_registry

    spec = load_registry().resolve(saved["model"])
    identity = run_identity(spec, saved["checkpoint"], saved["reduced"])
    recorded, now = saved.get("checkpoint_sha256"), identity["weights_sha256"]
    if recorded and saved["checkpoint"] not in (None, "registry") and now != recorded:
        raise LeapsError(f"checkpoint {saved['checkpoint']} is not the file the run started "
                         f"with (sha256 {recorded[:12]}... then, {str(now)[:12]}... now): restore "
                         "it to continue the run, or start a new run with another --out")
    return identity


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: str) -> str:
    """sha256 of a file, computed once per process for one (path, size, mtime)."""
    from leaps.adapter import sha256_file

    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def check_identity(path: Path, saved: Any, current: dict[str, Any]) -> None:
    """A state or batch result made by another model or checkpoint than the run's now is a
    StateError naming what differs."""
    if not isinstance(saved, dict):
        raise IdentityError(f"{path} records no model identity (written by another leaps "
                            "version, or edited)")
    differ = [key for key in current if saved.get(key) != current[key]]
    if differ:
        def shown(key: str, value: Any) -> str:
            if key == "weights_sha256" and isinstance(value, str):
                return value[:12] + "..."
            return repr(value)

        # The model's name says it all where it differs; the details where it does not.
        named = [k for k in differ if k in ("model", "adapter")] or differ
        diffs = "; ".join("arch differs" if key == "arch" else
                          f"{key} {shown(key, saved.get(key))} there, "
                          f"{shown(key, current[key])} now" for key in named)
        raise IdentityError(f"{path} was made by another model or checkpoint than the run's "
                         f"({diffs}): run.json was edited, the checkpoint file changed, or the "
                         "files come from different runs")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def write_outputs(run_dir: Path, video: Tensor, stimuli: list[Tensor], labels: list[str],
                  history: dict[str, list[float]],
                  stimulus_labels: list[str] | None = None) -> list[str]:
    """Write the synthesized clips (tensor, GIF, MP4), the frame grid and the loss curves.

    ``labels`` names each clip, ``stimulus_labels`` each stimulus (default: the distinct
    ``labels`` in order)."""
    video = video.detach().cpu().float()
    written = ["video.pt"]
    save_tensor(video, run_dir / "video.pt")
    for i, (clip, label) in enumerate(zip(video, labels)):
        stem = f"sample_{i}_{slug(label)}"
        write_gif(clip, run_dir / f"{stem}.gif")
        write_mp4(clip, run_dir / f"{stem}.mp4")
        written += [f"{stem}.gif", f"{stem}.mp4"]
    if stimulus_labels is None:
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
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def default_run_dir(model: str, root: str | os.PathLike[str] = "runs") -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{slug(model)}"
