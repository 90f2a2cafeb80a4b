"""Do attribution maps point at what moves? Faithfulness of each method on motion clips.

For each model it generates held-out clips of the synthetic motion dataset (leaps.datasets:
one object moving on a textured background, with per-frame object masks) at the model's
frames and size, explains each clip's true class with every method, and prints

  hit       pointing game: fraction of frames (showing the object) where the map's maximum
            lies inside the object mask
  del AUC   area under the deletion curve (top voxels replaced by the blurred clip first;
            lower = more faithful)
  ins AUC   area under the insertion curve (from the blurred clip; higher = more faithful)
  s/clip    seconds per clip of the method

next to three maps that use no model: a uniformly random map (chance), an input edge map
(what the clip's detail alone points at) and the object mask (the best possible). The models
must know the motion classes: the demo zoo (``leaps models demo``), or any registry model
trained here first with ``--train EPOCHS`` (its classifier is resized to the motion classes).
``--methods`` takes ``METHOD[@LAYER][:KEY=VALUE;...]`` items.

    python benchmarks/bench_attribution.py demo.x3d demo.r2plus1d
    python benchmarks/bench_attribution.py example.tiny3d --reduced --train 12
    python benchmarks/bench_attribution.py demo.x3d --methods gradcam,perturbation --json
    python benchmarks/bench_attribution.py demo.resnet3d --methods \
        gradcam,gradcam@blocks.1.res_blocks.2,ig,ig:baseline=blur,perturbation:iterations=150
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from leaps.datasets import MOTION_CLASSES, make_dataset
from leaps.demo import fit

DEFAULT_METHODS = ("gradcam", "integrated_gradients")


def train(model: nn.Module, classes: tuple[str, ...], epochs: int, clips_per_class: int = 32,
          seed: int = 0) -> float:
    """Train ``model`` on motion clips (seed ``seed``) from its current weights; return the
    training time in seconds."""
    spec = model.spec
    videos, labels, _ = make_dataset(clips_per_class, spec.frames, spec.size, seed=seed,
                                     classes=classes)
    started = time.perf_counter()
    fit(model, videos, labels, epochs)
    return time.perf_counter() - started


def load(name: str, reduced: bool, epochs: int, checkpoint: str | None = None
         ) -> tuple[nn.Module, tuple[str, ...], dict]:
    """The model and the motion classes it knows (trained here first when ``epochs``)."""
    from leaps.registry import build_model

    info: dict = {"checkpoint": checkpoint} if checkpoint else {}
    if epochs:
        with tempfile.TemporaryDirectory() as tmp:
            labels = Path(tmp) / "motion.txt"
            labels.write_text("\n".join(MOTION_CLASSES) + "\n")
            torch.manual_seed(0)
            model = build_model(name, labels=labels, reduced=reduced)
        info["train_seconds"] = round(train(model, MOTION_CLASSES, epochs), 1)
        info["trained_epochs"] = epochs
        return model, MOTION_CLASSES, info
    model = build_model(name, checkpoint=checkpoint, reduced=reduced)
    unknown = [c for c in model.labels if c not in MOTION_CLASSES]
    if unknown:
        raise SystemExit(f"{name} does not know the motion classes (it has e.g. {unknown[0]!r});"
                         " pick a demo model or pass --train EPOCHS")
    return model, tuple(model.labels), info


def parse_spec(text: str) -> tuple[str, str | None, dict]:
    """``METHOD[@LAYER][:KEY=VALUE;KEY=VALUE]`` -> (method, Grad-CAM layer, parameters)."""
    from leaps.explain import parse_params

    head, _, options = text.partition(":")
    method, _, layer = head.partition("@")
    return method, layer or None, parse_params([o for o in options.split(";") if o])


def control_maps(videos: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps that use no model, to read the methods' figures against:

    random   uniform noise: the chance level
    edges    |x - blur(x)|: where the clip has detail. On this data the object is the only
             sharp structure, so an input-only edge map already points at it; a method whose
             map carries a factor (x - baseline) inherits some of that
    object   the object mask itself: the best any map can do
    """
    from leaps.attribution import blur_frames, heatmap

    generator = torch.Generator().manual_seed(0)
    sigma = 0.1 * videos.shape[-1]
    return {"random": torch.rand(masks.shape, generator=generator),
            "edges (no model)": heatmap(videos - blur_frames(videos, sigma)),
            "object mask": masks.float()}


def evaluate(name: str, methods: list[str], clips_per_class: int, reduced: bool, epochs: int,
             steps: int, checkpoint: str | None = None) -> dict:
    from leaps.attribution import GradCAM, get_method, heatmap
    from leaps.faithfulness import deletion_curve, hit_rate, insertion_curve

    model, classes, info = load(name, reduced, epochs, checkpoint)
    spec = model.spec
    # seed 1000: clips the demo zoo and --train never saw
    videos, labels, masks = make_dataset(clips_per_class, spec.frames, spec.size, seed=1000,
                                         classes=classes)
    with torch.no_grad():
        accuracy = float((model(videos).argmax(1) == labels).float().mean())
    rows = {}
    controls = control_maps(videos, masks)
    for label in [*controls, *methods]:
        started = time.perf_counter()
        if label in controls:
            heat = controls[label]
        else:
            method_name, layer, params = parse_spec(label)
            method = get_method(method_name)
            explainer = GradCAM(model, layer) if method is GradCAM else method(model)
            params = method.check_parameters(params)
            maps = [explainer.attribute(batch, target=target, **params)
                    for batch, target in zip(videos.split(16), labels.split(16))]
            heat = heatmap(torch.cat(maps))
            if isinstance(explainer, GradCAM):  # name the layer used
                label = label.replace(f"{method_name}@{layer}" if layer else method_name,
                                      f"gradcam@{explainer.tap.name}")
        seconds = (time.perf_counter() - started) / len(videos)
        rows[label] = {
            "hit": hit_rate(heat, masks),
            "deletion_auc": float(deletion_curve(model, videos, heat, labels,
                                                 steps=steps).auc.mean()),
            "insertion_auc": float(insertion_curve(model, videos, heat, labels,
                                                   steps=steps).auc.mean()),
            "seconds_per_clip": seconds,
        }
    return {"model": name, "clips": len(videos), "input": [spec.frames, spec.size],
            "accuracy": accuracy, "object_fraction": float(masks.float().mean()), **info,
            "methods": rows}


def print_table(result: dict) -> None:
    extra = f", trained here {result['trained_epochs']} epochs" if "trained_epochs" in result \
        else ""
    print(f"\n{result['model']}: {result['clips']} clips {result['input'][0]}x"
          f"{result['input'][1]}², accuracy {result['accuracy']:.0%}, object "
          f"{result['object_fraction']:.1%} of the voxels{extra}")
    width = max(22, *(len(m) for m in result["methods"]))
    print(f"  {'method':{width}s} {'hit':>6s} {'del AUC':>8s} {'ins AUC':>8s} {'s/clip':>8s}")
    for method, row in result["methods"].items():
        print(f"  {method:{width}s} {row['hit']:6.1%} {row['deletion_auc']:8.3f} "
              f"{row['insertion_auc']:8.3f} {row['seconds_per_clip']:8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="registry model names (e.g. demo.x3d)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated METHOD[@LAYER][:KEY=VALUE;...] (Grad-CAM layer, "
                             "method parameters) [%(default)s]")
    parser.add_argument("--clips", type=int, default=4, help="clips per class [%(default)s]")
    parser.add_argument("--steps", type=int, default=16,
                        help="deletion/insertion steps [%(default)s]")
    parser.add_argument("--train", type=int, default=0, metavar="EPOCHS",
                        help="train each model on motion clips first (models that do not know "
                             "the motion classes)")
    parser.add_argument("--reduced", action="store_true", help="models at their test size")
    parser.add_argument("--checkpoint", help="weights to load (one model only) [default: the "
                                             "registry's]")
    parser.add_argument("--json", action="store_true", help="print JSON lines, not tables")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.models) > 1:
        parser.error("--checkpoint needs exactly one model")
    for name in args.models:
        result = evaluate(name, args.methods.split(","), args.clips, args.reduced, args.train,
                          args.steps, args.checkpoint)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
