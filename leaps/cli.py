"""The ``leaps`` command line. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from leaps.errors import LeapsError, Terminated

# Commands defined in their own modules, imported only when run (keeps `leaps --help` fast):
# name -> (module:attribute, the one-line help `leaps --help` shows).
LAZY_COMMANDS = {
    "explain": ("leaps.explain:explain",
                "Explain a model's decision on videos (saliency, IG, Grad-CAM, perturbation)."),
    "evaluate": ("leaps.evaluate:evaluate",
                 "Measure inversion runs: top-1, IS, motion test and oracle, naturalness."),
    "report": ("leaps.report:report",
               "Write one static HTML page of inversion runs with their evaluation."),
    "sweep": ("leaps.sweep:sweep",
              "Invert many models x seeds from a plan; batches shared out under torchrun."),
    "train-demo": ("leaps.demo:train_demo",
                   "Train the demo zoo on the synthetic motion dataset."),
}


class LeapsGroup(click.Group):
    """Turns a LeapsError into one ``error:`` line on stderr and exit code 2.

    Commands named in LAZY_COMMANDS are imported when first used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            import importlib

            module_name, attr = LAZY_COMMANDS[name][0].split(":")
            command = getattr(importlib.import_module(module_name), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command.get_short_help_str(limit=formatter.width - 24))
                for name, command in sorted(self.commands.items())]
        rows += [(name, help_line) for name, (_, help_line) in LAZY_COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def invoke(self, ctx: click.Context) -> Any:
        previous = _stop_on_sigterm()
        try:
            return super().invoke(ctx)
        except LeapsError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:  # before a command could say more (while importing)
            click.echo(f"{_stopped(exc)}; nothing was written", err=True)
            ctx.exit(_exit_code(exc))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm() -> Any:
    """Make SIGTERM (a scheduler's stop, ``timeout``, ``docker stop``) raise
    :class:`~leaps.errors.Terminated`, a KeyboardInterrupt: a command saves on it what it
    saves on Ctrl-C. A second SIGTERM while saving is ignored. Returns the previous handler
    (None where handlers cannot be set: not the main thread)."""
    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        return None


def _stopped(exc: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def _exit_code(exc: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


@click.group(cls=LeapsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leaps")
def cli() -> None:
    """See what video action-recognition models learned: LEAPS inversion for any family."""


def _console() -> Any:
    from rich.console import Console

    return Console()


def escape(text: str) -> str:
    """``text`` as rich shows it literally (``[extra]`` is not read as markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _table(title: str, columns: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def registry_option(command: Any) -> Any:
    """``--registry FILE`` (repeatable): registry YAML files added for this command."""

    def add(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
        if value:
            from leaps.registry import add_registry_files

            add_registry_files(value)

    return click.option("--registry", "registry_files", multiple=True, expose_value=False,
                        is_eager=True, callback=add, metavar="FILE",
                        help="A registry YAML file (registry.yaml's schema) whose models are "
                             "added; repeatable (also: LEAPS_REGISTRY, a path list).")(command)


def own_model_options(command: Any) -> Any:
    """``--config FILE`` with ``--frames``/``--size``: a model given by its library's config
    file (an mmaction2 config), with ``--checkpoint`` and ``--labels``; no registry entry."""
    for option in reversed([
        click.option("--config", "model_config", type=click.Path(dir_okay=False),
                     help="Your model's config file (an mmaction2 config, e.g. the one in "
                          "its work dir): the adapter and input come from it; pass --checkpoint "
                          "and --labels with it."),
        click.option("--frames", type=int, help="Input frames of a --config model [default: "
                                                 "its test pipeline's clip length]."),
        click.option("--size", type=int, help="Input crop size of a --config model [default: "
                                               "its test pipeline's crop]."),
    ]):
        command = option(command)
    return registry_option(command)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins, their versions, hooks and adapters, and what is wrong with any
    of them (one that failed to load, contributes no models, or clashes with another)."""
    from leaps.plugins import STRICT_ENV, get_host, strict_mode
    from leaps.registry import load_registry

    host = get_host(tolerant=True)  # problems are shown here, whatever LEAPS_STRICT_PLUGINS says
    load_registry()  # a plugin's broken registry entries are one of its problems
    infos = [*host.plugins.values(), *host.failed]
    rows = [vars(info) for info in infos]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table = _table("leaps plugins", ["plugin", "distribution", "version", "hooks",
                                         "adapters", "status"])
        for row in rows:
            status = ("ok" if row["loaded"] and not row["problems"] else
                      ("not loaded: " if not row["loaded"] else "") + "\n".join(row["problems"]))
            table.add_row(*map(escape, (row["name"], row["distribution"], row["version"],
                                        "\n".join(row["hooks"]) or "-",
                                        "\n".join(row["adapters"]) or "-", status)))
        _console().print(table)
    problems = len({problem for info in infos for problem in info.problems})
    if problems and strict_mode():
        raise LeapsError(f"{problems} plugin problem(s), listed above ({STRICT_ENV} is set)")


@cli.command()
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@registry_option
def models(pattern: str | None, as_json: bool) -> None:
    """List registry models (PATTERN: a glob or substring, e.g. 'mmaction.*' or 'x3d')."""
    from leaps.registry import load_registry, missing_requirements

    registry = load_registry()
    rows = []
    for spec in registry.models.values():
        if pattern and not (fnmatch.fnmatch(spec.name, pattern) or pattern in spec.name):
            continue
        reason = missing_requirements(spec)
        rows.append({
            "name": spec.name, "adapter": spec.adapter, "paper": spec.paper,
            "frames": spec.frames, "size": spec.size, "mean": spec.mean, "std": spec.std,
            "value_range": spec.value_range,
            "labels": (spec.labels if isinstance(spec.labels, str)
                       else f"{len(spec.labels)} classes"),
            "verifier": spec.verifier,
            "leaps": vars(spec.leaps),
            "checkpoint": spec.checkpoint.source if spec.checkpoint else None,
            "usable": reason is None, "why_not": reason, "source": spec.source,
        })
    if pattern and not rows:
        raise LeapsError(f"no registry model matches {pattern!r}; `leaps models` lists them all")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from importlib import resources

    builtin = str(resources.files("leaps") / "registry.yaml")
    columns = ["model", "adapter", "paper", "input", "labels", "verifier", "λ1/λL/r", "usable"]
    added = any(row["source"] != builtin for row in rows)
    table = _table(f"leaps models ({len(rows)})", columns + (["from"] if added else []))
    for row in rows:
        # escaped: rich would read "[transformers]" of a pip line as markup and drop it
        table.add_row(*map(escape, (
            row["name"], row["adapter"], row["paper"] or "",
            f"{row['frames']}x{row['size']}²", str(row["labels"]), row["verifier"],
            "{lambda_1:g}/{lambda_L:g}/{r:g}".format(**row["leaps"]),
            "yes" if row["usable"] else f"no: {row['why_not']}",
            *([("built-in" if row["source"] == builtin else row["source"])]
              if added else []))))
    _console().print(table)


@cli.command()
@click.option("--adapter", help="Adapter name (its default model is shown).")
@click.option("--model", help="Registry model name.")
@click.option("--full-size", is_flag=True,
              help="Use the model's real input size instead of its small test size.")
@click.option("--checkpoint", help="Weights (file or folder) whose architecture to show.")
@click.option("--labels", type=click.Path(), help="Class names, one a line (fine-tuned model).")
@own_model_options
def layers(adapter: str | None, model: str | None, full_size: bool, checkpoint: str | None,
           labels: str | None, model_config: str | None, frames: int | None,
           size: int | None) -> None:
    """Show a model's taps with their shapes, its norm layers and its Grad-CAM target."""
    import torch

    from leaps.model_files import resolve_model_options
    from leaps.registry import build_model
    from leaps.testing import capture_taps

    model, adapter, own = resolve_model_options(model, adapter, model_config, frames, size,
                                                labels)
    reduced = not (full_size or own)
    classifier = build_model(model, adapter=adapter, reduced=reduced, checkpoint=checkpoint,
                             labels=labels)
    spec = classifier.spec
    video = torch.rand(1, *spec.shape)
    with torch.no_grad():
        logits, videos, _ = capture_taps(classifier, video)
    console = _console()
    size = ("the reduced test size (--full-size shows the real one)" if reduced
            else "full size")
    console.print(escape(f"{classifier.model_name} (adapter {classifier.adapter_name}) at "
                         f"{size}: input 1x3x{spec.frames}x{spec.size}x{spec.size} -> logits "
                         f"{tuple(logits.shape)}"))
    table = _table(f"taps ({len(classifier.taps)})", ["#", "tap", "module", "[B, C, T, H, W]"])
    for i, (tap, out) in enumerate(zip(classifier.taps, videos), 1):
        table.add_row(str(i), tap.name, type(tap.module).__name__, str(list(out.shape)))
    console.print(table)
    norms = classifier.norm_layers
    kinds = sorted({type(layer.module).__name__ for layer in norms})
    stats = "running stats" if norms and norms[0].has_stats else "stats estimated from stimuli"
    console.print(f"norm layers: {len(norms)} ({', '.join(kinds)}; {stats})")
    console.print(f"Grad-CAM target: {classifier.gradcam_layer}")


def _config_options(command: Any) -> Any:
    """One CLI option per InvertConfig field, documented by the field's help metadata."""
    from dataclasses import MISSING, fields

    from leaps.config import InvertConfig

    for f in reversed(fields(InvertConfig)):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        helptext = f.metadata.get("help", "")
        if isinstance(default, bool):
            command = click.option(flag, f.name, is_flag=True, default=default,
                                   help=helptext)(command)
            continue
        choices = f.metadata.get("choices")
        kind: Any = (click.Choice(choices) if choices else
                     type(default) if isinstance(default, (int, str)) else float)
        command = click.option(flag, f.name, type=kind, default=None, show_default=False,
                               help=f"{helptext} [default: {default}]" if default is not None
                               else helptext)(command)
    return command


@cli.command()
@click.option("--model", help="Registry model to invert (`leaps models`).")
@click.option("--adapter", help="Adapter name; without --model, its default registry model.")
@click.option("--target", "targets", multiple=True,
              help="Target class name or index; repeat for a batch of targets; `all` for every "
                   "class of the label set.")
@click.option("--stimulus", "stimuli", multiple=True,
              help="Stimulus video (mp4/avi/webm/mkv/gif) or frame folder; repeat for "
                   "multi-stimulus priming; CLASS=PATH assigns it to one of several targets.")
@click.option("--stimuli", "stimuli_dir", type=click.Path(),
              help="Folder of stimuli per class: DIR/<class>/* (Kinetics layout) or "
                   "DIR/<class>_<n>.mp4 (a registry entry's stimuli folder); with --target "
                   "all, every class that has clips.")
@click.option("--verifier", "verifiers", multiple=True,
              help="Verifier model name, 'self' or 'none' [default: registry]; repeat for "
                   "several verifiers (R_feat, and --verifier-ce-weight, from each).")
@click.option("--verifier-checkpoint",
              help="Weights of the verifier (file or folder, its family's native format).")
@click.option("--checkpoint", help="Weights to load: a file in the family's native format, or "
                                   "'registry' for the entry's official checkpoint.")
@click.option("--labels", type=click.Path(),
              help="Class names, one a line, for a model fine-tuned on other classes.")
@click.option("--out", type=click.Path(),
              help="Run directory to create [default: runs/<time>-<model>].")
@click.option("--resume", type=click.Path(),
              help="Continue an interrupted run from its directory (its options are reused).")
@click.option("--reduced", is_flag=True, help="Build the models at their small test size.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@own_model_options
@_config_options
def invert(model: str | None, adapter: str | None, targets: tuple[str, ...],
           stimuli: tuple[str, ...], stimuli_dir: str | None, verifiers: tuple[str, ...],
           verifier_checkpoint: str | None, checkpoint: str | None,
           labels: str | None, out: str | None, resume: str | None, reduced: bool, quiet: bool,
           model_config: str | None, frames: int | None, size: int | None,
           **options: Any) -> None:
    """Synthesize videos of target classes from what a model learned (LEAPS)."""
    from leaps import runs
    from leaps.config import InvertConfig
    from leaps.invert import invert as run_inversion

    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if resume is not None and out is not None:
        raise LeapsError("--out cannot be given with --resume: a resumed run stays in its "
                         "directory; drop --out")
    if resume is None and out is None:
        named = model or (model_config and Path(model_config).stem) or adapter or "model"
        out = str(runs.default_run_dir(named))
    try:
        result = run_inversion(model, adapter=adapter, targets=targets, stimuli=stimuli,
                               verifier=list(verifiers) or None, checkpoint=checkpoint,
                               labels=labels,
                               config=None if resume else InvertConfig.from_preset(**given),
                               out=out,
                               resume=resume, reduced=reduced, progress=not quiet,
                               changes=given if resume else None,
                               verifier_checkpoint=verifier_checkpoint, stimuli_dir=stimuli_dir,
                               model_config=model_config, frames=frames, size=size)
    except KeyboardInterrupt as exc:
        click.echo(f"{_stopped(exc)}; {runs.stopped_state(Path(resume or out))}", err=True)
        raise SystemExit(_exit_code(exc)) from None
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # under torchrun rank 0 reports the run
    metrics = result.metrics
    judge = {"self": "verifier self (the model itself; --verifier NAME for another)",
             "none": "no verifier"}.get(str(result.verifier), f"verifier {result.verifier}")
    line = (f"model top-1 {metrics['model_accuracy']:.0%}; {judge}"
            + (f" top-1 {metrics['verifier_accuracy']:.0%}"
               if "verifier_accuracy" in metrics and result.verifier != "self" else ""))
    click.echo(f"{result.run_dir}: {len(result.labels)} clip(s) of "
               f"{', '.join(dict.fromkeys(result.labels))}; {line}")


def quiet_library_warnings() -> None:
    """Hide warnings that libraries raise about their own internals and a user can do
    nothing about: each matched by its message and the module that raises it, nothing else."""
    import warnings

    # pytorchvideo decorates functions with torch.jit.script at import; torch deprecates it.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning, module=r"torch\.jit\._script")


def main() -> None:
    quiet_library_warnings()
    cli(prog_name="leaps")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
