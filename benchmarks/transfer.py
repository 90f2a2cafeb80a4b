"""Do synthesized clips show what a model learned? Transfer of LEAPS clips across the demo zoo.

Every demo model is inverted (every class, ``--samples`` clips each, ``--seed`` repeatable) with
its default verifier, under one variant of the options (a preset, a parameterisation, an
augmentation ensemble ...), and the clips are judged by ``leaps evaluate``: top-1 by the
inverted model, by its verifier and by the two demo families that took no part in the
optimisation (unseen), the motion test (a clip reversed in time is read as the opposite class),
the motion oracle (a non-neural estimator confirms the object's motion), frame difference and
total variation relative to real clips (1.00 = as real), diversity (mean correlation of clips
of a class; lower = more diverse) and seconds per iteration. Each figure is printed as the
mean over seeds with its spread (min-max) in brackets.

    python benchmarks/transfer.py --variant default --out runs/transfer \\
        --markdown docs/ablation/transfer.md

``--set KEY=VALUE`` (repeatable) overrides any InvertConfig field for an ad-hoc variant. Run
directories that already hold a finished inversion are measured as they are, so a table can be
redone without inverting again; ``--markdown`` appends the table under its variant's heading.
"""

from __future__ import annotations

import argparse
import ast
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leaps.config import InvertConfig
from leaps.evaluate import evaluate_runs
from leaps.invert import invert
from leaps.registry import load_registry

DEMO = ("demo.resnet3d", "demo.x3d", "demo.r2plus1d", "demo.mvit")

# Named variants: a preset and the options that differ from it.
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"preset": "paper"},
    "default": {},
    "pixels + views": {"preset": "paper", "views": 4, "crop": 0.7, "noise": 0.05,
                       "time_shift": 1},
    "spectrum": {"preset": "paper", "param": "spectrum", "lr": 0.5},
    "spectrum, per class": {"preset": "paper", "param": "spectrum", "lr": 0.5,
                            "spectrum_source": "class"},
    "spectrum + views": {"preset": "paper", "param": "spectrum", "lr": 0.5, "views": 4,
                         "crop": 0.7, "noise": 0.05, "time_shift": 1},
    "warp": {"preset": "paper", "param": "warp", "lr": 0.5},
    "warp + views": {"preset": "paper", "param": "warp", "lr": 0.5, "views": 4, "crop": 0.7,
                     "noise": 0.05, "time_shift": 1},
    "spectrum + verifier CE": {"preset": "paper", "param": "spectrum", "lr": 0.5,
                               "verifier_ce_weight": 1.0},
    "spectrum per class + verifier CE": {"preset": "paper", "param": "spectrum", "lr": 0.5,
                                         "spectrum_source": "class",
                                         "verifier_ce_weight": 1.0},
    # Feature accentuation: start from a stimulus of the class instead of noise.
    "pixels, from stimulus": {"preset": "paper", "init": "stimulus"},
    "spectrum, from stimulus": {"preset": "paper", "param": "spectrum", "lr": 0.5,
                                "init": "stimulus"},
}


def judges(model: str) -> tuple[str, list[str]]:
    """The model's default verifier and the demo families that take no part (unseen)."""
    verifier = load_registry().get(model).verifier
    return verifier, [m for m in DEMO if m not in (model, verifier)]


def spread(values: list[float | None], percent: bool = True) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale, unit, digits = (100, "%", 0) if percent else (1, "", 2)
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    low, high = min(values) * scale, max(values) * scale
    return f"{mean:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def measure(model: str, options: dict[str, Any], seeds: list[int], samples: int,
            out: Path, stimuli: Path | None = None) -> dict[str, list[float | None]]:
    verifier, unseen = judges(model)
    preset = options.get("preset", "default")
    rows: dict[str, list[float | None]] = {}
    for seed in seeds:
        run_dir = out / model / f"seed{seed}"
        if not (run_dir / "video.pt").is_file():
            config = InvertConfig.from_preset(**{**options, "preset": preset, "seed": seed,
                                                 "samples": samples})
            invert(model, targets=["all"], config=config, out=run_dir, progress=False,
                   stimuli_dir=stimuli)
        result = evaluate_runs([run_dir], also=unseen)["runs"][0]
        m = result["metrics"]
        oracle = m.get("oracle") or {}
        values = {
            "model": m["top1_model"], "verifier": m["top1_verifier"],
            **{f"unseen {name}": m["top1_also"][name] for name in unseen},
            "unseen (mean)": statistics.fmean(m["top1_also"][name] for name in unseen),
            "motion test": m["motion_test_model"]["accuracy"],
            "oracle": oracle.get("accuracy"),
            "frame diff": m["frame_diff_rel"], "TV": m["tv_rel"],
            "diversity": m["diversity"], "s/it": result["seconds_per_iteration"],
        }
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
        print(f"  {model} seed {seed}: " + ", ".join(
            f"{k} {spread([v], k not in RAW)}" for k, v in values.items()), flush=True)
    return rows


RAW = ("frame diff", "TV", "diversity", "s/it")  # not percentages


def markdown(variant: str, options: dict[str, Any], results: dict[str, dict[str, list]],
             command: str, iterations: int, samples: int, seeds: list[int],
             minutes: float) -> str:
    header = ["inverted (verifier)", "model", "verifier", "unseen (mean of 2)", "unseen each",
              "motion test", "oracle", "frame diff", "TV", "diversity", "s/it"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, rows in results.items():
        verifier, unseen = judges(model)
        each = " / ".join(f"{name.split('.')[1]} {spread(rows[f'unseen {name}'])}"
                          for name in unseen)
        lines.append("| " + " | ".join([
            f"{model} ({verifier.split('.')[1]})", spread(rows["model"]),
            spread(rows["verifier"]), spread(rows["unseen (mean)"]), each,
            spread(rows["motion test"]), spread(rows["oracle"]),
            spread(rows["frame diff"], False), spread(rows["TV"], False),
            spread(rows["diversity"], False), spread(rows["s/it"], False)]) + " |")
    settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "the CLI's defaults"
    return "\n".join([
        f"## {variant}", "",
        f"`{command}`", "",
        f"Options: {settings}; {iterations} iterations, {samples} clips per class and "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}): {8 * samples} clips per model and "
        f"seed. Mean over seeds (min-max). {torch.get_num_threads()} CPU threads, "
        f"{platform.machine()}; {minutes:.0f} min in all.", "",
        *lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="default", choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override an InvertConfig field")
    parser.add_argument("--name", help="heading of the table [default: the variant]")
    parser.add_argument("--model", action="append", choices=DEMO,
                        help="invert only these demo models (repeatable) [default: all four]")
    parser.add_argument("--iterations", type=int, help="[default: the preset's]")
    parser.add_argument("--samples", type=int, default=4, help="clips per class")
    parser.add_argument("--seed", type=int, action="append", help="[default: 0 and 1]")
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--stimuli", type=Path,
                        help="stimulus folder (<class>_<i>.mp4) [default: the zoo's]")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args()
    options = dict(VARIANTS[args.variant])
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    if args.iterations:
        options["iterations"] = args.iterations
    iterations = InvertConfig.from_preset(**options).iterations
    seeds = args.seed or [0, 1]
    command = "python benchmarks/transfer.py " + shlex.join(sys.argv[1:])
    start = time.perf_counter()
    results = {}
    for model in args.model or DEMO:
        results[model] = measure(model, options, seeds, args.samples, args.out,
                                 args.stimuli)
    text = markdown(args.name or args.variant, options, results, command, iterations,
                    args.samples, seeds, (time.perf_counter() - start) / 60)
    if args.markdown:
        with args.markdown.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
