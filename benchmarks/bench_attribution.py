"""Do attribution maps point at what moves? Faithfulness of each method on motion clips.

For each model it generates held-out clips of the synthetic motion dataset (leaps.datasets:
one object moving on a textured background, with per-frame object masks) at the model's
frames and size, explains each clip's true class with every method, and prints

  hit       pointing game (Zhang et al. 2016): fraction of frames (showing the object) where
            the map's maximum lies inside the object mask (strict)
  hit@tol   the same within the original game's tolerance, 15 px at 224 px scaled to the
            clip (32 px: 2.14 px, Euclidean, as TorchRay scores it)
  hit t±1   strict, against the union of the object's masks at t-1, t, t+1 (where a motion
            detector with a 3-frame temporal kernel sees the object's displacement; a looser
            target, reported next to the strict one, never instead of it)
  hit rand. (--sanity) strict hit of the same method on a copy of the model with
            re-initialised weights (Adebayo et al. 2018): what the map reads from the input
  del AUC   area under the deletion curve (top voxels replaced by the blurred clip first;
            lower = more faithful)
  ins AUC   area under the insertion curve (from the blurred clip; higher = more faithful)
  s/clip    seconds per clip of the method

next to maps that use no model: a uniformly random map (chance), an input edge map (what the
clip's detail alone points at), the object mask (the best possible) and the object mask
averaged onto the default Grad-CAM layer's grid and upsampled as Grad-CAM upsamples (the best
any map at that resolution can do). All measures read each method's raw map (its positive
part, or the colour-summed magnitude for pixel maps), not the display heat map clipped at its
99th percentile, whose saturated top voxels would tie. The models
must know the motion classes: the demo zoo (``leaps models demo``), or any registry model
trained here first with ``--train EPOCHS`` (its classifier is resized to the motion classes).
``--methods`` takes ``METHOD[@LAYER][:KEY=VALUE;...]`` items.

    python benchmarks/bench_attribution.py demo.x3d demo.r2plus1d
    python benchmarks/bench_attribution.py example.tiny3d --reduced --train 12
    python benchmarks/bench_attribution.py demo.x3d --methods gradcam,perturbation --json
    python benchmarks/bench_attribution.py demo.resnet3d --methods \
        gradcam,gradcam@blocks.1.res_blocks.2,ig,ig:baseline=blur,perturbation:iterations=150
    python benchmarks/bench_attribution.py demo.r2plus1d --methods \
        "gradcam@blocks.1.res_blocks.2:weights=layercam,gradcam@blocks.1.res_blocks.2:weights=gradcam++"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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


def control_maps(model: nn.Module, videos: torch.Tensor, labels: torch.Tensor,
                 masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps that use no model, to read the methods' figures against:

    random     uniform noise: the chance level
    edges      |x - blur(x)|: where the clip has detail. On this data the object is the only
               sharp structure, so an input-only edge map already points at it; a method whose
               map carries a factor (x - baseline) inherits some of that
    object     the object mask itself: the best any map can do
    object at  the object mask averaged onto the default Grad-CAM layer's grid and upsampled
    Grad-CAM   trilinearly as Grad-CAM is: the best any map of that resolution can do (a
    grid      coarse map peaks at a cell centre or on a border plateau, not on every object)
    """
    from leaps.attribution import GradCAM, blur_frames, heatmap

    generator = torch.Generator().manual_seed(0)
    sigma = 0.1 * videos.shape[-1]
    controls = {"random": torch.rand(masks.shape, generator=generator),
                "edges (no model)": heatmap(videos - blur_frames(videos, sigma), percentile=100),
                "object mask": masks.float()}
    if hasattr(model, "taps"):
        cam = GradCAM(model)
        pair = cam.activations_and_gradients(videos[:1], labels[:1])
        grid = tuple(cam._usable_layer(videos[:1], labels[:1], *pair)[0].shape[2:])
        pooled = F.adaptive_avg_pool3d(masks.float()[:, None], grid)
        controls[f"object at {'x'.join(map(str, grid))} ({cam.tap.name})"] = F.interpolate(
            pooled, size=tuple(masks.shape[1:]), mode="trilinear", align_corners=False)[:, 0]
    return controls


def neighbour_masks(masks: torch.Tensor) -> torch.Tensor:
    """Each frame's object mask united with those of the frames before and after it."""
    union = masks.clone()
    union[:, 1:] |= masks[:, :-1]
    union[:, :-1] |= masks[:, 1:]
    return union


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (Adebayo et al. 2018's model
    randomisation test): a map that still points at the object is read from the input."""
    import copy

    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in twin.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return twin.eval()


def explain(model: nn.Module, label: str, videos: torch.Tensor, labels: torch.Tensor
            ) -> tuple[torch.Tensor, str]:
    """The raw map of one ``--methods`` item (positive part / colour-summed magnitude, scaled by
    its maximum: no percentile clipping, whose saturated top would tie) and the row's label."""
    from leaps.attribution import GradCAM, get_method, heatmap

    method_name, layer, params = parse_spec(label)
    method = get_method(method_name)
    explainer = GradCAM(model, layer) if method is GradCAM else method(model)
    params = method.check_parameters(params)
    maps = [explainer.attribute(batch, target=target, **params)
            for batch, target in zip(videos.split(16), labels.split(16))]
    if isinstance(explainer, GradCAM):  # name the layer used
        label = label.replace(f"{method_name}@{layer}" if layer else method_name,
                              f"gradcam@{explainer.tap.name}")
    return heatmap(torch.cat(maps), percentile=100), label


def evaluate(name: str, methods: list[str], clips_per_class: int, reduced: bool, epochs: int,
             steps: int, checkpoint: str | None = None, sanity: bool = False) -> dict:
    from leaps.faithfulness import deletion_curve, hit_rate, insertion_curve

    model, classes, info = load(name, reduced, epochs, checkpoint)
    spec = model.spec
    # seed 1000: clips the demo zoo and --train never saw
    videos, labels, masks = make_dataset(clips_per_class, spec.frames, spec.size, seed=1000,
                                         classes=classes)
    with torch.no_grad():
        accuracy = float((model(videos).argmax(1) == labels).float().mean())
    rows = {}
    controls = control_maps(model, videos, labels, masks)
    trail = neighbour_masks(masks)
    tolerance = 15 * spec.size / 224  # Zhang et al.'s 15 px at 224 px, scaled
    twin = randomised(model) if sanity else None
    for item in [*controls, *methods]:
        started = time.perf_counter()
        if item in controls:
            heat, label = controls[item], item
        else:
            heat, label = explain(model, item, videos, labels)
        seconds = (time.perf_counter() - started) / len(videos)
        rows[label] = {
            "hit": hit_rate(heat, masks),
            "hit_tolerance": hit_rate(heat, masks, tolerance),
            "hit_neighbours": hit_rate(heat, trail),
            "deletion_auc": float(deletion_curve(model, videos, heat, labels,
                                                 steps=steps).auc.mean()),
            "insertion_auc": float(insertion_curve(model, videos, heat, labels,
                                                   steps=steps).auc.mean()),
            "seconds_per_clip": seconds,
        }
        if twin is not None and item not in controls:  # the same method, randomised model
            rows[label]["hit_randomised"] = hit_rate(explain(twin, item, videos, labels)[0],
                                                     masks)
    return {"model": name, "clips": len(videos), "input": [spec.frames, spec.size],
            "tolerance_px": round(tolerance, 2),
            "accuracy": accuracy, "object_fraction": float(masks.float().mean()), **info,
            "methods": rows}


def print_table(result: dict) -> None:
    extra = f", trained here {result['trained_epochs']} epochs" if "trained_epochs" in result \
        else ""
    print(f"\n{result['model']}: {result['clips']} clips {result['input'][0]}x"
          f"{result['input'][1]}², accuracy {result['accuracy']:.0%}, object "
          f"{result['object_fraction']:.1%} of the voxels{extra}")
    width = max(22, *(len(m) for m in result["methods"]))
    tol = f"hit@{result['tolerance_px']:g}"
    sanity = any("hit_randomised" in row for row in result["methods"].values())
    print(f"  {'method':{width}s} {'hit':>6s} {tol:>9s} {'hit t±1':>8s} "
          + (f"{'hit rand.':>9s} " if sanity else "")
          + f"{'del AUC':>8s} {'ins AUC':>8s} {'s/clip':>8s}")
    for method, row in result["methods"].items():
        randomised_hit = "" if not sanity else f"{row['hit_randomised']:9.1%} " \
            if "hit_randomised" in row else f"{'-':>9s} "
        print(f"  {method:{width}s} {row['hit']:6.1%} {row['hit_tolerance']:9.1%} "
              f"{row['hit_neighbours']:8.1%} {randomised_hit}{row['deletion_auc']:8.3f} "
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
    parser.add_argument("--sanity", action="store_true",
                        help="also the pointing game of each method on a copy of the model "
                             "with re-initialised weights (Adebayo et al. 2018)")
    parser.add_argument("--json", action="store_true", help="print JSON lines, not tables")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.models) > 1:
        parser.error("--checkpoint needs exactly one model")
    for name in args.models:
        result = evaluate(name, args.methods.split(","), args.clips, args.reduced, args.train,
                          args.steps, args.checkpoint, args.sanity)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
