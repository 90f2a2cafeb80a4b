"""``leaps explain``: attribution maps for videos, written as overlays, grids, tensors and JSON.

For each video the output directory gets a folder with

    overlay.gif / overlay.mp4   the clip as the model saw it, the heat map blended on top
    grid.png                    frames left to right; rows: video, map, overlay
    map.pt                      the method's raw map ([3, T, H, W] pixel methods,
                                [1, T, H, W] Grad-CAM / perturbation)
    explanation.json            prediction (top 5), target, method and every parameter, model,
                                checkpoint hash, library versions

Everything is validated (method, parameters, model, target class, layer, every video) before
anything is written, and the output directory appears in one rename once all of it is there:
an error or an interrupt leaves no half-written directory. :func:`explain_videos` is the Python
API; the ``explain`` click command wraps it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from leaps.cli import own_model_options
from leaps.errors import LeapsError

# Frames smaller than this (short side) are scaled up by an integer factor (nearest neighbour)
# in the GIF and the grid, so a 32-pixel clip is still readable.
MIN_DISPLAY_SIDE = 96
TOP_K = 5


@dataclass
class Explanation:
    """One video's explanation."""

    video: str
    clip: Tensor          # [3, T, H, W] in [0, 1], as the model saw it
    attribution: Tensor   # the method's raw map for this clip, [C, T, H, W]
    heatmap: Tensor       # [T, H, W] in [0, 1]
    target: int
    target_name: str
    probabilities: Tensor  # [K] softmax of the clean clip's logits
    record: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict; values read as int, float, true/false, else string."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LeapsError(f"--param {item!r} is not KEY=VALUE; write e.g. --param n_steps=64")
        params[key.strip()] = _parse_value(text.strip())
    return params


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _check_params(method: Any, params: dict[str, Any], layer: str | None) -> dict[str, Any]:
    """The method's full parameter set (defaults updated by ``params``), checked."""
    if layer is not None and method.name != "gradcam":
        raise LeapsError(f"--layer applies to gradcam only, not {method.name}; drop it or pass "
                         "--method gradcam")
    return method.check_parameters(params)


def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise LeapsError(f"output directory {out} already exists and is not empty; pass another "
                         "--out")


def _display(clip: Tensor) -> Tensor:
    """Scale a small clip ``[3, T, H, W]`` up by an integer factor for display."""
    factor = -(-MIN_DISPLAY_SIDE // min(clip.shape[-2:]))
    if factor <= 1:
        return clip
    return F.interpolate(clip[None], scale_factor=(1, factor, factor), mode="nearest")[0]


def _folder_names(videos: Sequence[str | Path]) -> list[str]:
    from leaps.runs import slug

    names: list[str] = []
    for video in videos:
        base = slug(Path(str(video).rstrip("/")).stem or "video")
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _write_video_outputs(folder: Path, item: Explanation, fps: float, alpha: float) -> list[str]:
    from leaps.runs import write_json
    from leaps.video import (
        colormap,
        overlay_heatmap,
        save_tensor,
        write_gif,
        write_grid_png,
        write_mp4,
    )

    folder.mkdir(parents=True)
    overlay = overlay_heatmap(item.clip, item.heatmap, alpha=alpha)
    write_gif(_display(overlay), folder / "overlay.gif", fps=fps)
    write_mp4(overlay, folder / "overlay.mp4", fps=fps)
    rows = [_display(item.clip), _display(colormap(item.heatmap)), _display(overlay)]
    write_grid_png(rows, folder / "grid.png", row_labels=["video", "map", "overlay"])
    save_tensor(item.attribution, folder / "map.pt")
    files = ["overlay.gif", "overlay.mp4", "grid.png", "map.pt", "explanation.json"]
    item.record["files"] = files
    write_json(folder / "explanation.json", item.record)
    return files


def explain_videos(videos: Sequence[str | Path], model: str | None = None, *,
                   adapter: str | None = None, method: str = "gradcam",
                   target: str | int | None = None, layer: str | None = None,
                   params: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
                   labels: str | Path | None = None, reduced: bool = False,
                   out: str | Path | None = None, device: str = "auto", batch_size: int = 4,
                   fps: float = 8.0, alpha: float = 0.5,
                   on_warning: Callable[[str], None] | None = None,
                   model_config: str | Path | None = None, frames: int | None = None,
                   size: int | None = None) -> list[Explanation]:
    """Explain a registry model's decision on each video with one attribution method.

    ``model``/``adapter`` pick the registry entry (``checkpoint``/``labels`` for fine-tuned
    weights, ``reduced`` for its small test size), or ``model_config`` is the model's own
    config file (:mod:`leaps.model_files`; ``frames``/``size`` override its input);
    ``method`` is a name of :data:`leaps.attribution.METHODS` (aliases: ig, gxi, grad-cam,
    extremal ...), ``params`` its keyword parameters, ``layer`` the Grad-CAM tap. ``target``
    is a class name or index for every video; None explains each video's predicted class.
    Clips are read at the model's input size and explained ``batch_size`` at a time. With
    ``out`` the files described in this module's docstring are written (atomically, as one
    directory); without it nothing is written. Raises :class:`LeapsError` (nothing written)
    for any bad input.
    """
    from leaps.adapter import checkpoint_sha256
    from leaps.attribution import GradCAM, get_method, heatmap
    from leaps.invert import resolve_device, resolve_target
    from leaps.model_files import config_record, resolve_model_options
    from leaps.plugins import get_host
    from leaps.registry import build_model, load_registry
    from leaps.runs import library_versions
    from leaps.video import read_clips

    if not videos:
        raise LeapsError("no video given; pass at least one video file or frame folder")
    method_cls = get_method(method)
    parameters = _check_params(method_cls, dict(params or {}), layer)
    if batch_size < 1:
        raise LeapsError(f"--batch-size must be an integer >= 1, got {batch_size}")
    if not (math.isfinite(fps) and fps > 0):
        raise LeapsError(f"--fps must be a number > 0 (frames per second of the written GIF "
                         f"and MP4), got {fps:g}")
    if on_warning is None:
        from leaps.invert import warn as on_warning
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        _check_out(out_dir)
    torch_device = resolve_device(device)
    forced = adapter if model_config is not None else None
    model, adapter, _ = resolve_model_options(model, adapter, model_config, frames, size, labels)
    spec = load_registry().resolve(model, adapter)
    classifier = build_model(spec.name, checkpoint=checkpoint, labels=labels, reduced=reduced,
                             device=str(torch_device))
    class_names = classifier.labels
    given = resolve_target(target, class_names) if target is not None else None
    fs = classifier.spec

    def short(source: str | Path, count: int) -> None:
        on_warning(f"video {source} has {count} frame(s), fewer than the model's {fs.frames}: "
                   "its frames are repeated in order (stretched in time) to explain it")

    clips = read_clips(videos, fs.frames, fs.size, short, on_warning)
    explainer = (GradCAM(classifier, layer) if method_cls is GradCAM
                 else method_cls(classifier))
    method_kwargs = dict(parameters)

    started = time.perf_counter()
    probabilities, maps = [], []
    for batch in clips.split(batch_size):
        batch = batch.to(torch_device)
        with torch.no_grad():
            probs = F.softmax(classifier(batch).float(), dim=1)
        targets = (torch.full((len(batch),), given, dtype=torch.long, device=torch_device)
                   if given is not None else probs.argmax(dim=1))
        maps.append(explainer.attribute(batch, target=targets, **method_kwargs).detach().cpu())
        probabilities.append(probs.cpu())
    seconds = time.perf_counter() - started
    if isinstance(explainer, GradCAM):
        parameters["layer"] = explainer.tap.name  # the layer used (the default may step back)
    attributions = torch.cat(maps).float()
    probs_all = torch.cat(probabilities)
    heat = heatmap(attributions)

    if checkpoint == "registry" and spec.checkpoint is not None:
        weights: str | None = spec.checkpoint.source
    elif checkpoint is not None:
        weights = str(checkpoint)
    else:  # an entry that ships its weights as a file loads them by default
        weights = str(spec.checkpoint_path()) if spec.checkpoint_path() else None
    common = {
        "model": spec.name, "adapter": spec.adapter, "checkpoint": weights,
        "model_config": (config_record(spec, model_config, forced, frames, size)
                         if model_config is not None else None),
        "checkpoint_sha256": (checkpoint_sha256(spec.adapter, weights)
                              if weights and Path(weights).exists() else None),
        "labels": str(labels) if labels else None, "reduced": reduced,
        "input": {"frames": fs.frames, "size": fs.size},
        "method": method_cls.name, "parameters": parameters,
        "device": str(torch_device), "seconds_per_video": seconds / len(clips),
        "versions": library_versions([*get_host().adapter(spec.adapter).requires, "captum"]),
    }
    results = []
    for i, video in enumerate(videos):
        probs = probs_all[i]
        index = given if given is not None else int(probs.argmax())
        top = probs.topk(min(TOP_K, len(probs)))
        predicted = int(top.indices[0])
        record = {
            "video": str(video), **common,
            "target": {"index": index, "name": class_names[index],
                       "source": "given" if given is not None else "predicted"},
            "target_probability": float(probs[index]),
            "prediction": {"index": predicted, "name": class_names[predicted],
                           "probability": float(top.values[0])},
            "top5": [{"index": int(k), "name": class_names[int(k)], "probability": float(p)}
                     for p, k in zip(top.values, top.indices)],
            "map": {"file": "map.pt", "kind": method_cls.kind,
                    "shape": list(attributions[i].shape),
                    "min": float(attributions[i].min()), "max": float(attributions[i].max())},
            # where in time the map puts its mass: mean heat per frame
            "temporal_profile": [round(float(v), 4) for v in heat[i].mean(dim=(1, 2))],
        }
        results.append(Explanation(str(video), clips[i], attributions[i], heat[i], index,
                                   class_names[index], probs, record))
    if out_dir is not None:
        _write_all(out_dir, results, fps, alpha)
    return results


def _write_all(out_dir: Path, results: list[Explanation], fps: float, alpha: float) -> None:
    """Write every video's folder into a hidden temporary directory, then rename it to
    ``out_dir`` in one step (an empty existing ``out_dir`` is replaced)."""
    _check_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for name, item in zip(_folder_names([r.video for r in results]), results):
            _write_video_outputs(staging / name, item, fps, alpha)
            item.directory = out_dir / name
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above): rename needs the name free
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for item in results:
            item.directory = None
        raise


@click.command()
@click.argument("videos", nargs=-1, required=True)
@click.option("--model", help="Registry model (`leaps models`).")
@click.option("--adapter", help="Adapter name; without --model, its default registry model.")
@click.option("--method", default="gradcam", show_default=True,
              help="saliency, gradient_x_input, integrated_gradients (ig), smoothgrad, gradcam, "
                   "perturbation (spatiotemporal extremal perturbation).")
@click.option("--target", help="Class name or index to explain [default: each video's "
                                "predicted class].")
@click.option("--layer", help="Grad-CAM layer: a tap name (`leaps layers`) [default: the "
                               "adapter's Grad-CAM layer].")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="A method parameter, e.g. -p n_steps=64 -p baseline=blur (ig), "
                   "-p temporal=clip -p weights=gradcam++ (gradcam), -p area=0.05 "
                   "-p iterations=500 (perturbation); see docs/attribution.md.")
@click.option("--checkpoint", help="Weights to load: a file in the family's native format, or "
                                   "'registry' for the entry's official checkpoint.")
@click.option("--labels", type=click.Path(dir_okay=False),
              help="Class names, one a line, for a model fine-tuned on other classes.")
@click.option("--reduced", is_flag=True, help="Build the model at its small test size.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output directory to create [default: explanations/<time>-<model>-<method>].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Videos explained per pass.")
@click.option("--fps", type=float, default=8.0, show_default=True,
              help="Frame rate of the written GIF and MP4.")
@own_model_options
def explain(videos: tuple[str, ...], model: str | None, adapter: str | None, method: str,
            target: str | None, layer: str | None, params: tuple[str, ...],
            checkpoint: str | None, labels: str | None, reduced: bool, out: str | None,
            device: str, batch_size: int, fps: float, model_config: str | None,
            frames: int | None, size: int | None) -> None:
    """Explain a model's decision on each VIDEO: heat-map overlays (GIF, MP4), a frame grid,
    the raw map and a JSON record per video."""
    from leaps.attribution import get_method
    from leaps.runs import default_run_dir

    if out is None:
        name = model or (model_config and Path(model_config).stem) or adapter or "model"
        out = str(default_run_dir(f"{name}-{get_method(method).name}", root="explanations"))
    results = explain_videos(videos, model, adapter=adapter, method=method, target=target,
                             layer=layer, params=parse_params(params), checkpoint=checkpoint,
                             labels=labels, reduced=reduced, out=out, device=device,
                             batch_size=batch_size, fps=fps, model_config=model_config,
                             frames=frames, size=size)
    for item in results:
        prediction = item.record["prediction"]
        click.echo(f"{item.video}: predicted {prediction['name']!r} "
                   f"({prediction['probability']:.0%}); {item.record['method']} map of "
                   f"{item.target_name!r} -> {item.directory}")
