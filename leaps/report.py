"""``leaps report``: one static HTML page for inversion runs, self-contained (every image is
embedded as a data URI), so it opens from disk with no server and can be mailed or archived.

Per run: per target class, the stimulus and the synthesized GIFs side by side with what each
judge said of them; the loss curves; the frame grid. On top: the evaluation table of
:mod:`leaps.evaluate`. A small script marks every image that failed to render (a banner names
how many), which is also how the test suite checks the page in a headless browser.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from leaps.errors import LeapsError
from leaps.evaluate import LEGEND, Run, evaluate_runs, load_run, table, write_text
from leaps.runs import expand_run_dirs

# Synthesized clips are small (32 px for the demo zoo): shown at least this wide, scaled by an
# integer factor with pixelated rendering so no blur is invented.
MIN_DISPLAY = 128

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; font-size: 0.9em; }
th { background: #f2f2f2; text-align: left; }
img.clip { image-rendering: pixelated; display: block; }
img:not(.clip) { max-width: 100%; }
figure { display: inline-block; margin: 0 0.4em 0.4em 0; }
figcaption { font-size: 0.75em; color: #555; max-width: 16em; word-break: break-all; }
.legend { font-size: 0.85em; color: #444; max-width: 70em; }
.missing { color: #a33; font-size: 0.85em; }
.ok { color: #17692c; } .bad { color: #a33; }
#image-check { background: #fde2e2; border: 1px solid #a33; padding: 0.5em; }
"""

# Runs after every image has loaded (or failed): marks each with data-rendered and shows a
# banner when any failed, so a broken page is visible to the reader, not only to tests.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = 0;
  images.forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-rendered", ok ? "yes" : "no");
    if (!ok) { broken += 1; }
  });
  var note = document.getElementById("image-check");
  note.setAttribute("data-broken", String(broken));
  if (broken > 0) {
    note.textContent = broken + " of " + images.length + " images failed to render";
    note.hidden = false;
  }
  document.body.setAttribute("data-images-checked", String(images.length));
});
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(data: bytes, mime: str, alt: str, width: int | None = None, css: str = "") -> str:
    size = f' width="{width}"' if width else ""
    cls = f' class="{css}"' if css else ""
    return f'<img{cls}{size} alt="{_esc(alt)}" src="{_data_uri(data, mime)}">'


def _display_width(size: int) -> int:
    return size * max(1, math.ceil(MIN_DISPLAY / size))


def _gif_bytes(clip: Any, workdir: Path, name: str) -> bytes:
    """A ``[3, T, H, W]`` clip encoded as a GIF (through leaps.video's writer)."""
    from leaps.video import write_gif

    return write_gif(clip, workdir / name).read_bytes()


def _synthesized(run: Run, index: int, label: str, workdir: Path) -> bytes:
    """The run's GIF of clip ``index``, or one rendered from video.pt when it is missing."""
    from leaps.runs import slug

    gif = run.path / f"sample_{index}_{slug(label)}.gif"
    if gif.is_file():
        return gif.read_bytes()
    return _gif_bytes(run.video[index], workdir, f"sample_{index}.gif")


def _stimuli(run: Run, target: int, label: str, workdir: Path
             ) -> list[tuple[str, bytes | None, str]]:
    """(caption, GIF bytes or None, why missing) for each stimulus of the ``target``-th target.

    A ``stimulus_<target>_<class>.gif`` in the run directory is used when present; otherwise
    the stimulus files run.json names are read at the model's input size."""
    from leaps.runs import slug
    from leaps.video import read_clip

    stored = run.path / f"stimulus_{target}_{slug(label)}.gif"
    if stored.is_file():
        return [(stored.name, stored.read_bytes(), "")]
    groups = run.record.get("stimuli") or []
    paths = groups[target] if target < len(groups) else []
    frames, size = run.record["input"]["frames"], run.record["input"]["size"]
    shown = []
    for j, path in enumerate(paths):
        if not Path(path).exists():
            why = "not found (relative paths are read from the current directory)"
            shown.append((str(path), None, why))
            continue
        try:
            clip = read_clip(path, frames, size)
        except LeapsError as exc:
            shown.append((str(path), None, str(exc)))
            continue
        shown.append((str(path), _gif_bytes(clip, workdir, f"stimulus_{target}_{j}.gif"), ""))
    return shown


def _verdicts(clip: dict[str, Any]) -> str:
    def mark(value: str | None, expected: str | None) -> str:
        if value is None:
            return "-"
        good = value == expected
        return f'<span class="{"ok" if good else "bad"}">{_esc(value)}</span>'

    model = mark(clip["model_top1"], clip["target"])
    lines = [f"model: {model} (p={clip['target_prob']:.2f})"]
    if clip["verifier_top1"] is not None:
        lines.append(f"verifier: {mark(clip['verifier_top1'], clip['target'])}")
    for name, value in clip["also_top1"].items():
        lines.append(f"{_esc(name)}: {mark(value, clip['target'])}")
    if clip["opposite"] is not None:
        lines.append(f"reversed: {mark(clip['reversed_model_top1'], clip['opposite'])}")
    if clip["oracle_reason"] is not None:
        lines.append("oracle: " + (mark(clip["oracle"], clip["target"]) if clip["oracle"]
                                   else f"abstained ({_esc(clip['oracle_reason'])})"))
    if clip["frame_diff_rel"] is not None:
        lines.append(f"frame diff ×real {clip['frame_diff_rel']:.2f}, "
                     f"TV ×real {clip['tv_rel']:.2f}")
    return "<br>".join(lines)


def _run_section(run: Run, result: dict[str, Any], workdir: Path) -> str:
    from leaps.runs import write_loss_curves

    record = run.record
    size = run.video.shape[-1]
    width = _display_width(size)
    targets = record["target_names"]
    samples = run.samples
    meta = (f"model <b>{_esc(result['model'])}</b> ({_esc(result['adapter'])}), verifier "
            f"{_esc(result['verifier'] or 'none')}, x* {_esc(result.get('param', 'pixels'))} "
            f"with {result.get('views', 1)} view(s) per step (preset "
            f"{_esc(result.get('preset', 'paper'))}), "
            f"{result['iterations']} iterations, seed "
            f"{result['seed']}, {samples} sample(s) per class, input {run.video.shape[2]}×"
            f"{size}×{size}")
    if result.get("random_weights"):
        meta += (f' <span class="bad">— {_esc(", ".join(result["random_weights"]))} had no '
                 "weights (random initialisation): their verdicts are chance</span>")
    rows = []
    for t, label in enumerate(targets):
        stimuli = []
        for caption, data, why in _stimuli(run, t, label, workdir):
            if data is None:
                stimuli.append(f'<p class="missing">stimulus {_esc(caption)}: {_esc(why)}</p>')
            else:
                image = _img(data, "image/gif", f"stimulus {label}", width, "clip")
                stimuli.append(f"<figure>{image}<figcaption>{_esc(Path(caption).name)}"
                               "</figcaption></figure>")
        synthesized, verdicts = [], []
        for s in range(samples):
            i = t * samples + s
            image = _img(_synthesized(run, i, label, workdir), "image/gif",
                         f"leaps {label} sample {s}", width, "clip")
            synthesized.append(f"<figure>{image}<figcaption>sample {s}</figcaption></figure>")
            verdicts.append(f"<p>sample {s}: {_verdicts(result['clips'][i])}</p>")
        rows.append(f"<tr><th>{_esc(label)}</th><td>{''.join(stimuli) or '-'}</td>"
                    f"<td>{''.join(synthesized)}</td><td>{''.join(verdicts)}</td></tr>")
    loss = run.path / "loss.png"
    if not loss.is_file() and (record.get("history") or {}).get("total"):
        loss = workdir / f"loss_{id(run)}.png"
        write_loss_curves(record["history"], loss)
    loss_html = (_img(loss.read_bytes(), "image/png", "loss curves") if loss.is_file()
                 else '<p class="missing">no loss history recorded</p>')
    grid = run.path / "grid.png"
    grid_html = (f"<details><summary>frame grid (stimuli and samples, frame by frame)</summary>"
                 f"{_img(grid.read_bytes(), 'image/png', 'frame grid')}</details>"
                 if grid.is_file() else "")
    return (f'<section class="run"><h2>{_esc(run.path.name)}</h2><p>{meta}</p>'
            "<table><tr><th>class</th><th>stimulus</th><th>synthesized</th>"
            f"<th>judged as</th></tr>{''.join(rows)}</table>"
            f"<h3>loss curves</h3>{loss_html}{grid_html}</section>")


def _evaluation_table(evaluation: dict[str, Any]) -> str:
    header, rows = table(evaluation)
    head = "".join(f"<th>{_esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="evaluation"><tr>{head}</tr>{body}</table>' \
           f'<p class="legend">{_esc(LEGEND)}</p>'


def render_report(runs: Sequence[Run], evaluation: dict[str, Any]) -> str:
    """The report page for loaded runs and their evaluation (:func:`evaluate_runs`)."""
    with tempfile.TemporaryDirectory(prefix="leaps-report-") as tmp:
        sections = [_run_section(run, result, Path(tmp))
                    for run, result in zip(runs, evaluation["runs"])]
    names = ", ".join(_esc(run.path.name) for run in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>leaps report: {names}</title><style>{_STYLE}</style></head><body>"
        f"<h1>leaps report</h1><p>{len(runs)} run(s): {names}; leaps "
        f"{_esc(evaluation.get('leaps_version', '?'))}</p>"
        '<div id="image-check" hidden></div>'
        f"<h2>evaluation</h2>{_evaluation_table(evaluation)}{''.join(sections)}"
        f"<script>{_SCRIPT}</script></body></html>\n")


def _matching_evaluation(path: Path, run_dirs: Sequence[Path]) -> dict[str, Any]:
    try:
        evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeapsError(f"cannot read evaluation {path} ({str(exc).splitlines()[0]}); pass "
                         "the JSON `leaps evaluate --json` wrote") from None
    covered = [Path(r.get("run_dir", "")).resolve() for r in evaluation.get("runs", [])] \
        if isinstance(evaluation, dict) else []
    if covered != [Path(p).resolve() for p in run_dirs]:
        raise LeapsError(f"evaluation {path} covers other runs than the ones given; run "
                         "`leaps evaluate` on these runs (in this order) with --json, or drop "
                         "--evaluation")
    return evaluation


def write_report(run_dirs: Sequence[str | Path], out: str | Path = "report.html",
                 also: Sequence[str] = (), evaluation: str | Path | dict[str, Any] | None = None,
                 device: str = "cpu") -> Path:
    """Evaluate runs (or take ``evaluation``: a dict of :func:`evaluate_runs` or the JSON file
    ``leaps evaluate --json`` wrote) and write the report page to ``out`` atomically. ``out``
    is checked first, so a path that cannot be written fails before any evaluation."""
    from leaps.files import check_output_file

    check_output_file(out)
    paths = expand_run_dirs(run_dirs)
    runs = [load_run(p) for p in paths]
    if evaluation is None:
        evaluation = evaluate_runs(paths, also, device)
    elif not isinstance(evaluation, dict):
        evaluation = _matching_evaluation(Path(evaluation), paths)
    return write_text(out, render_report(runs, evaluation))


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default="report.html", show_default=True,
              type=click.Path(path_type=Path), help="The HTML page to write.")
@click.option("--also", "also", multiple=True, metavar="MODEL",
              help="Another registry model that judges the clips (as in `leaps evaluate`).")
@click.option("--evaluation", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the JSON of `leaps evaluate --json` for these runs instead of "
                   "evaluating again.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or auto.")
def report(run_dirs: tuple[Path, ...], out: Path, also: tuple[str, ...],
           evaluation: Path | None, device: str) -> None:
    """Write one static HTML page (no server needed) of inversion runs (a `leaps sweep`
    directory: all of its runs) with, per class, the stimulus and
    synthesized GIFs side by side, the loss curves and the evaluation table."""
    path = write_report(run_dirs, out, also, evaluation, device)
    click.echo(f"wrote {path} (open it in a browser: file://{path.resolve()})")
