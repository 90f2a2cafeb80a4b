"""The paper's ablation (Table 3 / S2 style) on a demo-zoo model: what each LEAPS term adds.

Variants: CE only; CE + priming; CE + priming + coherence; full LEAPS (+ R_feat on the
verifier); and full LEAPS priming only the first 20/40/60/80% of the taps (100% = full LEAPS).
Each variant inverts every class of the model (``--samples`` clips each, different seeds
within the batch) and is measured by ``leaps evaluate``: top-1 by the model, by its verifier
and by unseen families (``--also``), Inception Score, motion test, motion oracle, naturalness
and diversity. The Markdown table is written with the command that produced it.

    python benchmarks/ablation.py --model demo.resnet3d --also demo.r2plus1d \\
        --iterations 150 --out runs/ablation --markdown docs/ablation/demo.resnet3d.md

Run directories that already hold a finished inversion are measured as they are (so the
measurements can be redone without inverting again).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from leaps.config import InvertConfig
from leaps.evaluate import evaluate_runs, write_text
from leaps.invert import invert

VARIANTS: dict[str, dict[str, float]] = {
    "CE only": {"priming_weight": 0.0, "coherence_weight": 0.0, "feature_weight": 0.0},
    "CE + priming": {"coherence_weight": 0.0, "feature_weight": 0.0},
    "CE + priming + coherence": {"feature_weight": 0.0},
    "full LEAPS": {},
    "priming first 20% of taps": {"priming_fraction": 0.2},
    "priming first 40% of taps": {"priming_fraction": 0.4},
    "priming first 60% of taps": {"priming_fraction": 0.6},
    "priming first 80% of taps": {"priming_fraction": 0.8},
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(model: str, also: list[str], rows: list[tuple[str, dict]], command: str,
             seconds: float) -> str:
    unseen = [name for name in also]
    header = (["variant", "model top-1", "verifier top-1"]
              + [f"{name} top-1 (unseen)" for name in unseen]
              + ["IS (model)", "motion test", "oracle (abstain)", "frame diff (rel)",
                 "TV (rel)", "diversity", "p(target)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in rows:
        m = run["metrics"]
        oracle = m.get("oracle") or {}
        score = m.get("inception_score_model") or {}
        cells = ([name, _pct(m["top1_model"]), _pct(m["top1_verifier"])]
                 + [_pct(m["top1_also"].get(a)) for a in unseen]
                 + [f"{score['mean']:.2f} ± {score['std']:.2f}" if score else "-",
                    _pct(m["motion_test_model"]["accuracy"]),
                    f"{_pct(oracle.get('accuracy'))} ({_pct(oracle.get('abstention'))})",
                    _num(m["frame_diff_rel"]), _num(m["tv_rel"]), _num(m["diversity"]),
                    _num(m["target_prob"])])
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0][1]
    return "\n".join([
        f"# LEAPS ablation on `{model}`", "",
        f"Produced by `{command}`", "",
        f"{first['iterations']} iterations, {first['samples']} clips per class "
        f"({len(first['targets'])} per variant), verifier `{first['verifier']}`; seconds per "
        f"iteration {first['seconds_per_iteration'] or 0:.3f} (CPU, "
        f"{torch.get_num_threads()} threads, {platform.machine()}); "
        f"whole ablation {seconds / 60:.1f} min.", "",
        "Columns: top-1 of the synthesized clips by the inverted model, its verifier and models "
        "of families that took no part in the optimisation; Inception Score by the model; the "
        "motion test (a clip reversed in time is classified as the opposite class); the "
        "motion oracle (a non-neural estimator of the object's motion: confirmed / all clips, "
        "abstentions in brackets); frame-to-frame difference and spatial total variation "
        "relative to real clips of the same class (1.00 = as real); diversity = mean pairwise "
        "correlation of clips of the same class (lower = more diverse); mean target "
        "probability.", "",
        *lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo.resnet3d")
    parser.add_argument("--also", action="append", default=[],
                        help="unseen model to judge the clips (repeatable)")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="run only these variants (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()
    command = "python benchmarks/ablation.py " + shlex.join(sys.argv[1:])
    start = time.perf_counter()
    names = args.variant or list(VARIANTS)
    run_dirs = {name: args.out / name.replace(" ", "_").replace("%", "").replace("+", "plus")
                for name in names}
    for name, run_dir in run_dirs.items():  # all inversions first, then every measurement
        if (run_dir / "video.pt").is_file():
            print(f"{name}: {run_dir} exists, measuring it as it is", flush=True)
            continue
        # The paper's terms, so the paper's setting (pixels, one view: --preset paper).
        config = InvertConfig.from_preset("paper", iterations=args.iterations,
                                          samples=args.samples, seed=args.seed,
                                          **VARIANTS[name])
        invert(args.model, targets=["all"], config=config, out=run_dir, progress=False)
        print(f"{name}: inverted in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for name, run_dir in run_dirs.items():
        result = evaluate_runs([run_dir], also=args.also)
        rows.append((name, result["runs"][0]))
        m = result["runs"][0]["metrics"]
        print(f"{name}: model {_pct(m['top1_model'])}, verifier {_pct(m['top1_verifier'])}, "
              + ", ".join(f"{a} {_pct(m['top1_also'].get(a))}" for a in args.also)
              + f", oracle {_pct((m.get('oracle') or {}).get('accuracy'))}", flush=True)
    text = markdown(args.model, args.also, rows, command, time.perf_counter() - start)
    if args.markdown:
        write_text(args.markdown, text)
    print(text)


if __name__ == "__main__":
    main()
