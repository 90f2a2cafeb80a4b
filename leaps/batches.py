"""Batches as units of work, and the processes that share them out (torchrun).

A run synthesizes ``samples`` clips of each of its targets: clip ``(t, s)`` is sample ``s`` of
the run's ``t``-th target, in target-major order (the order of ``video.pt``). The clips are cut
into batches of ``batch_size`` (the last may be smaller); one batch is one
:class:`~leaps.invert.Inverter` optimising its clips together. A batch's result depends only on
the model, the options, its clips and the seed: each clip's initial noise is drawn from a seed
of its own (:func:`clip_seed`, from the run's seed, the clip's class and sample index) and the
batch's jitter and flips from :func:`batch_seed`; not on which process runs it, nor on what
else runs.

In a run directory each batch keeps its own files under ``batches/``:

    batch_<i>.state.pt   its resumable optimisation state, while it runs or when stopped
    batch_<i>.done.pt    its finished clips, loss history, metrics and who ran it; written
                         atomically, it marks the batch done (never redone)

Under torchrun (``WORLD_SIZE`` > 1) each process (rank) takes every ``WORLD_SIZE``-th of the
unfinished batches; the collectives are only small control messages (no tensor crosses
processes), so they go through gloo on CPU and GPU machines alike, each rank computing on
``cuda:LOCAL_RANK`` when CUDA is there.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from leaps.errors import LeapsError

BATCH_DIR = "batches"
# How long a process waits for the others at a barrier: the slowest rank's last batch.
WAIT = timedelta(hours=float(os.environ.get("LEAPS_DIST_TIMEOUT_H", "72")))


@dataclass(frozen=True)
class Batch:
    """One unit of work: its index in the run and its clips as (target position, sample)."""

    index: int
    clips: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        return f"batch_{self.index:04d}"


def plan_batches(targets: int, samples: int, batch_size: int) -> list[Batch]:
    """The run's ``targets x samples`` clips, target-major, cut into batches of ``batch_size``."""
    clips = [(t, s) for t in range(targets) for s in range(samples)]
    return [Batch(start // batch_size, tuple(clips[start:start + batch_size]))
            for start in range(0, len(clips), batch_size)]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts`` (stable across processes and machines)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def clip_seed(seed: int, target: int, sample: int) -> int:
    """The seed of one clip's initial noise: its class index and sample index under ``seed``."""
    return derive_seed(seed, "clip", target, sample)


def batch_seed(seed: int, index: int) -> int:
    """The seed of one batch's jitter and flip sequence."""
    return derive_seed(seed, "batch", index)


@dataclass
class Processes:
    """This process's place among the run's processes: torchrun's WORLD_SIZE / RANK /
    LOCAL_RANK, or one process alone."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # this object started the process group (and ends it)

    @classmethod
    def from_environment(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        try:
            rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise LeapsError("WORLD_SIZE is set but RANK is not (or not a number): start the "
                             "processes with torchrun, or unset WORLD_SIZE") from None
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=WAIT)
            owns = True
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
        return cls(world, rank, local, owns)

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world}" if self.world > 1 else ""

    def device(self, configured: str) -> str:
        """The device of this rank: ``auto`` under torchrun with CUDA is ``cuda:LOCAL_RANK``."""
        if self.world > 1 and configured == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return configured

    def share(self, units: Sequence[Any]) -> list[Any]:
        """This rank's share of ``units`` (the same list on every rank): every world-th."""
        return list(units[self.rank::self.world])

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on rank 0 (others get [])."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out or []

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def on_rank0(processes: Processes, action: Any) -> Any:
    """Run ``action()`` on rank 0 only; a LeapsError it raises is raised on every rank (the
    others would otherwise wait for rank 0 forever). Returns rank 0's result everywhere."""
    result, error = None, None
    if processes.rank == 0:
        try:
            result = action()
        except LeapsError as exc:
            error = exc
    failed = processes.broadcast(str(error) if error is not None else None)
    if error is not None:
        raise error
    if failed is not None:
        raise LeapsError(failed)
    return processes.broadcast(result)


class BatchFiles:
    """The per-batch files of a run directory (see the module's docstring). ``identity``
    (:func:`leaps.runs.run_identity`) is saved with every state and result and, on reading
    one, must match: a run is never continued or finished with another model's batches."""

    def __init__(self, run_dir: Path, identity: dict[str, Any] | None = None) -> None:
        self.dir = run_dir / BATCH_DIR
        self.identity = identity

    def state_path(self, batch: Batch) -> Path:
        return self.dir / f"{batch.name}.state.pt"

    def done_path(self, batch: Batch) -> Path:
        return self.dir / f"{batch.name}.done.pt"

    def save_state(self, batch: Batch, state: Any) -> None:
        from leaps.runs import write_state

        self.dir.mkdir(exist_ok=True)
        write_state(self.state_path(batch), state, self.identity)

    def load_state(self, batch: Batch) -> Any:
        """The batch's saved state, or None; a damaged, foreign or other model's state is a
        LeapsError saying what to do."""
        from leaps.runs import StateError, read_state

        path = self.state_path(batch)
        if not path.is_file():
            return None
        try:
            return read_state(path, self.identity)
        except StateError as exc:
            raise self._cannot_use(exc, batch) from None

    def _cannot_use(self, exc: Exception, batch: Batch) -> LeapsError:
        from leaps.runs import IdentityError

        run = self.dir.parent
        if isinstance(exc, IdentityError):
            return LeapsError(f"{exc}; the run cannot continue from it: restore run.json or the "
                              "checkpoint as they were, or start a new run with another --out")
        return LeapsError(f"{exc}; the run cannot continue from it: restore the file from a "
                          f"copy, or delete it and `leaps invert --resume {run}` starts batch "
                          f"{batch.index} over")

    def finish(self, batch: Batch, result: dict[str, Any]) -> None:
        """Mark ``batch`` done with its ``result`` (atomic), then drop its state."""
        from leaps.files import write_bytes
        from leaps.runs import STATE_FORMAT

        self.dir.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        torch.save({**result, "format": STATE_FORMAT, "identity": self.identity}, buffer)
        write_bytes(self.done_path(batch), buffer.getvalue())
        self.state_path(batch).unlink(missing_ok=True)

    def result(self, batch: Batch) -> dict[str, Any] | None:
        """The finished batch's result, or None; a damaged or other model's one is a
        LeapsError saying what to do."""
        from leaps.files import load_torch_file
        from leaps.runs import STATE_FORMAT, StateError, check_identity

        path = self.done_path(batch)
        if not path.is_file():
            return None
        try:
            try:
                result = load_torch_file(path)
            except LeapsError as exc:
                raise StateError(f"{path} {exc}") from None
            keys = ("video", "steps", "history", "metrics", "clips")
            if not isinstance(result, dict) or any(k not in result for k in keys):
                raise StateError(f"{path} is not a finished batch of leaps (damaged or edited)")
            if result.get("format") != STATE_FORMAT:
                raise StateError(f"{path} is of another format ({result.get('format')!r}, this "
                                 f"leaps reads {STATE_FORMAT})")
            if self.identity is not None:
                check_identity(path, result.get("identity"), self.identity)
        except StateError as exc:
            raise self._cannot_use(exc, batch) from None
        return result

    def saved(self) -> bool:
        """Whether any batch has saved anything (a state or a result)."""
        return self.dir.is_dir() and any(self.dir.glob("batch_*.pt"))

    def steps_done(self, batches: Sequence[Batch]) -> int:
        """The most steps any batch has run (for ``--resume --iterations`` checks)."""
        steps = 0
        for batch in batches:
            done = self.result(batch)
            if done is not None:
                steps = max(steps, int(done["steps"]))
                continue
            state = self.load_state(batch)
            if state is not None:
                steps = max(steps, state.step)
        return steps

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def who() -> dict[str, Any]:
    """Which process ran a batch."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
