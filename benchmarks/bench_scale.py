"""Clips per hour against the number of processes, and what a GPU machine would give.

For each process count P (default 1 and 2) it runs the real command

    torchrun --standalone --nproc-per-node P --no-python leaps invert --model M --target all
             --samples S --batch-size B --iterations I --verifier V --out DIR --quiet

(on CPU the machine's cores split evenly among the processes, OMP_NUM_THREADS = cores / P,
or ``--threads`` each; on a CUDA machine each process takes cuda:LOCAL_RANK) and prints, from
the wall time and the run's run.json: clips per hour, the speed-up over the first row, the
seconds of one iteration of a full batch (each batch's optimisation time / its steps, median)
and the seconds outside the batches (process start, model build, priming, merge, writing the
outputs: wall time minus the busiest rank's batch time), which sharding cannot shrink.

Then it projects a whole label set, by default Kinetics-400 at one clip per class and the
paper's 2000 iterations, from the measured per-iteration times: with D devices each running
one batch at a time, a run of N clips in ceil(N / B) batches takes

    ceil(ceil(N / B) / D) x iterations x (seconds per batch iteration) + outside seconds

on this machine (D = the most processes measured, at the per-iteration time measured with
that many) and on a GPU machine of ``--gpus`` GPUs, from ``--gpu-iteration-s``: the seconds
of one iteration of a batch of B clips of the same model on one GPU, as measured there by
this script (``--processes 1``, its ``s/iteration`` column; on a CUDA machine the measured
rows are GPU rows and the first one's time is used when ``--gpu-iteration-s`` is not given).
It prints both figures and their ratio. Without a GPU time it says how to get one: a GPU
figure is never guessed.

    python benchmarks/bench_scale.py                      # demo.resnet3d, 1 and 2 processes
    python benchmarks/bench_scale.py --repeat 3           # on a shared machine: fastest of 3
    python benchmarks/bench_scale.py --threads 1          # 1 thread a process: P cores for P
    python benchmarks/bench_scale.py --gpu-iteration-s 0.05 --gpus 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def measure(processes: int, args: argparse.Namespace, out: Path) -> dict:
    """Run the command under torchrun with ``processes`` processes; its figures."""
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), "--no-python",
               str(Path(sys.executable).with_name("leaps")), "invert", "--model", args.model,
               "--target", "all", "--samples", str(args.samples), "--batch-size",
               str(args.batch_size), "--iterations", str(args.iterations), "--verifier",
               args.verifier, "--out", str(out), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        # leaps's own one-line errors first: torchrun's report of the failed ranks follows them
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        why = "; ".join(dict.fromkeys(errors)) or proc.stderr[-2000:]
        fail(f"{' '.join(command)} failed: {why}", 2 if errors else 1)
    record = json.loads((out / "run.json").read_text())
    batches = record["batches"]
    clips = sum(len(b["clips"]) for b in batches)
    full = [b for b in batches if len(b["clips"]) == args.batch_size] or batches
    busiest = max(sum(b["elapsed_s"] for b in batches if b["rank"] == rank)
                  for rank in range(processes))
    return {"processes": processes, "threads": env["OMP_NUM_THREADS"],
            "device": batches[0]["device"], "clips": clips, "batches": len(batches),
            "wall_s": wall, "clips_per_hour": clips / wall * 3600,
            "iteration_s": statistics.median(b["elapsed_s"] / b["steps"] for b in full),
            "outside_s": max(0.0, wall - busiest)}


def project(clips: int, batch: int, devices: int, iterations: int, iteration_s: float,
            outside_s: float) -> tuple[float, float]:
    """Wall seconds and clips per hour of ``clips`` clips on ``devices`` devices."""
    rounds = math.ceil(math.ceil(clips / batch) / devices)
    wall = rounds * iterations * iteration_s + outside_s
    return wall, clips / wall * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo.resnet3d")
    parser.add_argument("--verifier", default="self")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int,
                        help="Threads of each process (default: the cores / the processes).")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Runs of each process count (alternating); the fastest is kept.")
    parser.add_argument("--gpu-iteration-s", type=float,
                        help="Seconds of one iteration of a batch of --batch-size clips of "
                             "--model on one GPU (this script's s/iteration there).")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--project-clips", type=int, default=400,
                        help="Clips of the projected run (default: Kinetics-400, one each).")
    parser.add_argument("--project-iterations", type=int, default=2000)
    args = parser.parse_args()
    if min(args.processes + [args.batch_size, args.iterations, args.repeat, args.gpus,
                             args.project_clips, args.project_iterations,
                             args.threads or 1]) < 1:
        fail("--processes, --batch-size, --iterations, --threads, --repeat, --gpus and "
             "--project-* must be at least 1")
    if args.gpu_iteration_s is not None and not args.gpu_iteration_s > 0:
        fail("--gpu-iteration-s must be a positive number of seconds")

    # Each count --repeat times, the counts alternating, the fastest of each kept: on a shared
    # machine the load of other work slows some runs, never speeds one up.
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):
            for processes in args.processes:
                row = measure(processes, args, Path(tmp) / f"p{processes}-{repeat}")
                if processes not in best or row["wall_s"] < best[processes]["wall_s"]:
                    best[processes] = row
    rows = [best[p] for p in args.processes]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.model} (verifier {args.verifier}), --target all --samples {args.samples} "
          f"--batch-size {args.batch_size} --iterations {args.iterations}, fastest of "
          f"{args.repeat}; {os.cpu_count()} cores, load average {load}")
    print("| processes | threads each | device | clips | batches | wall s | clips/hour | "
          "speed-up | s/iteration (batch) | outside batches s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['threads']} | {row['device']} | {row['clips']} | "
              f"{row['batches']} | {row['wall_s']:.1f} | {row['clips_per_hour']:.0f} | "
              f"{row['clips_per_hour'] / rows[0]['clips_per_hour']:.2f}x | "
              f"{row['iteration_s']:.4f} | {row['outside_s']:.1f} |")

    widest = max(rows, key=lambda r: r["processes"])
    n, b, its = args.project_clips, args.batch_size, args.project_iterations
    print(f"\nprojected: {n} clips, {its} iterations, batches of {b} "
          f"({math.ceil(n / b)} batches); outside the batches {widest['outside_s']:.1f} s "
          f"as measured here")
    here_wall, here_rate = project(n, b, widest["processes"], its, widest["iteration_s"],
                                   widest["outside_s"])
    print(f"  this machine, {widest['processes']} process(es) at {widest['iteration_s']:.4f} s "
          f"per batch iteration: {here_wall / 3600:.1f} h, {here_rate:.0f} clips/hour")
    gpu_s = args.gpu_iteration_s
    if gpu_s is None and rows[0]["device"].startswith("cuda"):
        gpu_s = rows[0]["iteration_s"]
    if gpu_s is None:
        print(f"  a GPU machine: pass --gpu-iteration-s T, T = the s/iteration column of "
              f"`python benchmarks/bench_scale.py --processes 1 --model {args.model} "
              f"--batch-size {b}` run there")
        return
    gpu_wall, gpu_rate = project(n, b, args.gpus, its, gpu_s, widest["outside_s"])
    print(f"  {args.gpus} GPU(s) at {gpu_s:.4f} s per batch iteration: "
          f"{gpu_wall / 3600:.2f} h, {gpu_rate:.0f} clips/hour")
    print(f"  ratio, GPU machine / this machine: {gpu_rate / here_rate:.1f}x")


if __name__ == "__main__":
    main()
