"""The ``leaps`` command line. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import fnmatch
import json
import sys
from typing import Any

import click

from leaps.errors import LeapsError


class LeapsGroup(click.Group):
    """Turns a LeapsError into one ``error:`` line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LeapsError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=LeapsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leaps")
def cli() -> None:
    """See what video action-recognition models learned: LEAPS inversion for any family."""


def _console() -> Any:
    from rich.console import Console

    return Console()


def _table(title: str, columns: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins, their versions, hooks and adapters."""
    from leaps.plugins import get_host

    host = get_host()
    rows = [vars(info) for info in host.plugins.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = _table("leaps plugins", ["plugin", "distribution", "version", "hooks", "adapters"])
    for row in rows:
        table.add_row(row["name"], row["distribution"], row["version"], "\n".join(row["hooks"]),
                      "\n".join(row["adapters"]) or "-")
    _console().print(table)


@cli.command()
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
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
            "labels": spec.labels if isinstance(spec.labels, str) else f"{len(spec.labels)} classes",
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
    table = _table(f"leaps models ({len(rows)})",
                   ["model", "adapter", "paper", "input", "labels", "verifier",
                    "λ1/λL/r", "usable"])
    for row in rows:
        table.add_row(row["name"], row["adapter"], row["paper"] or "",
                      f"{row['frames']}x{row['size']}²", str(row["labels"]), row["verifier"],
                      "{lambda_1:g}/{lambda_L:g}/{r:g}".format(**row["leaps"]),
                      "yes" if row["usable"] else f"no: {row['why_not']}")
    _console().print(table)


@cli.command()
@click.option("--adapter", help="Adapter name (its default model is shown).")
@click.option("--model", help="Registry model name.")
@click.option("--full-size", is_flag=True,
              help="Use the model's real input size instead of its small test size.")
def layers(adapter: str | None, model: str | None, full_size: bool) -> None:
    """Show a model's taps with their shapes, its norm layers and its Grad-CAM target."""
    import torch

    from leaps.registry import build_model
    from leaps.testing import capture_taps

    classifier = build_model(model, adapter=adapter, reduced=not full_size)
    spec = classifier.spec
    video = torch.rand(1, *spec.shape)
    with torch.no_grad():
        logits, videos, _ = capture_taps(classifier, video)
    console = _console()
    console.print(f"[bold]{classifier.model_name}[/bold] (adapter {classifier.adapter_name}), "
                  f"input 1x3x{spec.frames}x{spec.size}x{spec.size} -> logits "
                  f"{tuple(logits.shape)}")
    table = _table(f"taps ({len(classifier.taps)})", ["#", "tap", "module", "[B, C, T, H, W]"])
    for i, (tap, out) in enumerate(zip(classifier.taps, videos), 1):
        table.add_row(str(i), tap.name, type(tap.module).__name__, str(list(out.shape)))
    console.print(table)
    norms = classifier.norm_layers
    kinds = sorted({type(layer.module).__name__ for layer in norms})
    stats = "running stats" if norms and norms[0].has_stats else "stats estimated from stimuli"
    console.print(f"norm layers: {len(norms)} ({', '.join(kinds)}; {stats})")
    console.print(f"Grad-CAM target: {classifier.gradcam_layer}")


def main() -> None:
    cli(prog_name="leaps")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
