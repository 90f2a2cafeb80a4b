"""``leaps sweep PLAN.yaml``: many models (and seeds) inverted as one body of work.

A plan names the models, the targets, the seeds and the options::

    targets: all             # class names or indices, or all (default: all)
    seeds: [0, 1]            # one run per model and seed (default: [0])
    options:                 # for every model: options of `leaps invert` (InvertConfig fields)
      iterations: 2000
      samples: 2
      batch_size: 8
    models:                  # registry models, each with its own options (these win), and
      demo.resnet3d: {}      # verifier, checkpoint, verifier_checkpoint, labels, reduced,
      demo.x3d: {verifier: self, lr: 0.05}   # stimuli, stimuli_dir, targets

``stimuli_dir`` is `leaps invert --stimuli DIR`: stimuli per class, ``DIR/<class>/*`` (the
Kinetics layout) or ``DIR/<class>_<n>.<ext>``. The per-model keys may also stand in
``options``, for every model.

Each (model, seed) is one run directory ``OUT/<model>-seed<seed>``, the same as `leaps invert`
writes; every (run, batch) is one unit of work, and under torchrun the units are shared out
among the processes like the batches of one run. A finished run is skipped and an unfinished
one resumed (with the plan's options: only those `--resume` may change can differ), so running
the same plan again finishes what is left. ``OUT/sweep.json`` lists the runs;
``leaps evaluate OUT`` and ``leaps report OUT`` take the whole directory.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click

from leaps.config import InvertConfig
from leaps.errors import LeapsError

PLAN_KEYS = ("targets", "seeds", "options", "models")
# Per-model keys that are not InvertConfig fields: what names the run.
RUN_KEYS = ("verifier", "checkpoint", "verifier_checkpoint", "labels", "reduced", "stimuli",
            "stimuli_dir", "targets")
SWEEP_FILE = "sweep.json"


@dataclass
class PlannedRun:
    """One (model, seed) of a plan: its run directory's name and `leaps invert`'s arguments."""

    name: str
    model: str
    seed: int
    options: dict[str, Any]   # InvertConfig values given by the plan (with the seed)
    arguments: dict[str, Any]  # targets, stimuli (and stimuli_dir), verifier, checkpoints, ...


def _unknown(path: Path, where: str, key: str, known: list[str]) -> LeapsError:
    close = difflib.get_close_matches(key, known, n=2)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return LeapsError(f"{path}: unknown key {key!r} in {where}; {hint}expected one of "
                      f"{', '.join(known)}")


def read_plan(path: str | Path) -> list[PlannedRun]:
    """The runs of a plan file, validated (every key, every option, every seed)."""
    import yaml

    from leaps.runs import slug

    path = Path(path)
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LeapsError(f"cannot read sweep plan {path} ({exc.strerror or exc}); pass a YAML "
                         "file (see `leaps sweep --help`)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise LeapsError(f"sweep plan {path} is not valid YAML{line}: fix it (see `leaps sweep "
                         "--help` for the layout)") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("models"), dict) \
            or not plan["models"]:
        raise LeapsError(f"sweep plan {path} names no models: give a mapping `models:` of "
                         "registry model names to their options (`{}` for none)")
    for key in plan:
        if key not in PLAN_KEYS:
            raise _unknown(path, "the plan", str(key), list(PLAN_KEYS))
    option_names = [f.name for f in fields(InvertConfig) if f.name != "seed"]
    common = plan.get("options") or {}
    if not isinstance(common, dict):
        raise LeapsError(f"{path}: `options` must be a mapping of option names to values")
    seeds = plan.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise LeapsError(f"{path}: `seeds` must be a list of whole numbers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise LeapsError(f"{path}: `seeds` lists a seed twice ({seeds}); give each once")
    targets = plan.get("targets", "all")
    planned = []
    for model, own in plan["models"].items():
        own = own or {}
        if not isinstance(own, dict):
            raise LeapsError(f"{path}: the options of model {model!r} must be a mapping "
                             "(`{}` for none)")
        merged = {**common, **own}
        for key in merged:
            if key not in option_names and key not in RUN_KEYS:
                raise _unknown(path, f"the options of {model}" if key in own else "options",
                               str(key), option_names + list(RUN_KEYS))
        options = {k: v for k, v in merged.items() if k in option_names}
        arguments = {k: v for k, v in merged.items() if k in RUN_KEYS}
        chosen = arguments.pop("targets", targets)
        arguments["targets"] = [chosen] if isinstance(chosen, (str, int)) else list(chosen)
        stimuli = arguments.get("stimuli", [])
        arguments["stimuli"] = [stimuli] if isinstance(stimuli, str) else list(stimuli)
        for seed in seeds:
            config = InvertConfig.from_preset(**options, seed=seed)
            config.validate()
            planned.append(PlannedRun(f"{slug(str(model))}-seed{seed}", str(model), seed,
                                      {**options, "seed": seed}, arguments))
    return planned


def run_sweep(plan: str | Path, out: str | Path, progress: bool = True,
              on_warning: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run (or finish) every run of ``plan`` under ``out``; returns one row per run (its
    directory, model, seed and what happened: done before, or run now)."""
    from leaps import runs
    from leaps.batches import Processes
    from leaps.invert import prepare_run, warn

    on_warning = on_warning or warn
    planned = read_plan(plan)
    out = Path(out)
    processes = Processes.from_environment()
    held: list[Any] = []
    try:
        if processes.rank == 0:
            from leaps.files import check_output_dir

            check_output_dir(out)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                from leaps.files import WriteError

                raise WriteError(out, error) from None
        processes.barrier()
        rows, prepared = [], []
        for item in planned:
            run_dir = out / item.name
            status = (runs.read_run(run_dir).get("status")
                      if (run_dir / runs.RUN_FILE).is_file() else None)
            row = {"run_dir": str(run_dir), "model": item.model, "seed": item.seed}
            if status == "done":
                rows.append({**row, "status": "done before"})
                continue
            if status is not None:
                run = prepare_run(resume=run_dir, changes=item.options, on_warning=on_warning,
                                  processes=processes, held=held)
            else:
                run = prepare_run(item.model, config=InvertConfig.from_preset(**item.options),
                                  out=run_dir,
                                  on_warning=on_warning, processes=processes, held=held,
                                  **item.arguments)
            prepared.append(run)
            rows.append({**row, "status": "resumed" if status is not None else "run"})
        units = processes.broadcast([(i, batch) for i, run in enumerate(prepared)
                                     for batch in run.batches if not run.is_done(batch)])
        for i, batch in processes.share(units):
            prepared[i].work([batch], progress)
        processes.barrier()
        for run in prepared:
            run.finish()
        if processes.rank == 0:
            runs.write_json(out / SWEEP_FILE, {"plan": str(plan), "runs": rows,
                                               "world_size": processes.world})
        return rows
    finally:
        for lock in held:
            lock.release()
        processes.close()


@click.command()
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Sweep directory, one run directory per model and seed in it "
                   "[default: sweeps/<plan name>].")
@click.option("--quiet", is_flag=True, help="No progress.")
def sweep(plan: Path, out: Path | None, quiet: bool) -> None:
    """Invert many models x seeds from a PLAN.yaml; every (model, batch) is a unit of work,
    shared out among the processes under torchrun; running it again skips finished runs and
    resumes the others.

    \b
    PLAN.yaml:
      targets: all           # or a list of classes (default: all)
      seeds: [0, 1]          # one run per model and seed (default: [0])
      options: {iterations: 2000, samples: 2, batch_size: 8}   # any `leaps invert` option
      models:                # registry models with their own options, verifier, checkpoint,
        demo.resnet3d: {}    # verifier_checkpoint, labels, reduced, stimuli, stimuli_dir
        demo.x3d: {verifier: self, lr: 0.05}   # (--stimuli DIR), targets
    """
    import os

    out = out or Path("sweeps") / plan.stem
    try:
        rows = run_sweep(plan, out, progress=not quiet)
    except KeyboardInterrupt as exc:
        from leaps.errors import Terminated

        term = isinstance(exc, Terminated)
        click.echo(f"{'terminated (SIGTERM)' if term else 'interrupted'}; run `leaps sweep "
                   f"{plan} --out {out}` again to finish it", err=True)
        raise SystemExit(143 if term else 130) from None
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for row in rows:
            click.echo(f"{row['run_dir']}: {row['model']} seed {row['seed']}: {row['status']}")
        click.echo(f"wrote {out / SWEEP_FILE}; `leaps report {out}` shows them all")
