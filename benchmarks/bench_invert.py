"""How close a LEAPS iteration is to the floor: one plain forward+backward of model (+ verifier).

For each case it measures, on the same batch and device:
  plain     seconds of one forward+backward to the input of the model, and of the verifier
  leaps     seconds of one LEAPS iteration (jitter, flip, all terms, Adam step, clamp)
and prints the ratios leaps / (model + verifier) and, for verifier = self, leaps / model,
plus the ratio of peak resident memory (each measurement runs in its own process).

    python benchmarks/bench_invert.py              # all cases, batch 2
    python benchmarks/bench_invert.py --case r3d   # one case
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = {
    # name: (model, verifier, input override (frames, size) or None)
    "x3d_xs": ("pytorchvideo.x3d_xs", None, (4, 160)),
    "r3d": ("torchvision.r3d_18", None, (8, 112)),
    "swin3d": ("torchvision.swin3d_t", None, (8, 112)),
}


def _build(name: str, size: tuple[int, int] | None):
    from dataclasses import replace

    from leaps.plugins import get_host
    from leaps.registry import load_registry

    spec = load_registry().get(name)
    if size is not None:
        spec = replace(spec, frames=size[0], size=size[1])
    torch.manual_seed(0)
    return spec, get_host().adapter(spec.adapter)().build(spec)


def _time(step, iterations: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - start) / iterations


def measure(case: str, what: str, batch: int, iterations: int, warmup: int) -> dict:
    """One measurement, run in a fresh process so that its peak memory is its own.

    plain_model: model fwd+bwd; plain_pair: model and verifier fwd+bwd (both loaded);
    leaps_other / leaps_self: LEAPS iterations with the verifier / with verifier = self.
    """
    from dataclasses import replace

    from leaps.invert import Inverter, InvertConfig, resample

    model_name, verifier_name, size = CASES[case]
    spec, model = _build(model_name, size)
    model.requires_grad_(False)
    verifier_name = verifier_name or spec.verifier
    x = torch.rand((batch, *model.spec.shape), requires_grad=True)
    target = torch.zeros(batch, dtype=torch.long)

    def plain(net):
        def step():
            x.grad = None
            view = resample(x, net.spec.frames, net.spec.size)
            torch.nn.functional.cross_entropy(net(view), target).backward()
        return step

    result: dict = {"verifier": verifier_name}
    if what == "plain_model":
        result["seconds"] = _time(plain(model), iterations, warmup)
    elif what == "plain_pair":
        _, verifier = _build(verifier_name, None)
        verifier.requires_grad_(False)
        result["seconds"] = _time(plain(model), iterations, warmup)
        result["verifier_seconds"] = _time(plain(verifier), iterations, warmup)
    else:
        verifier = "self"
        if what == "leaps_other":
            _, verifier = _build(verifier_name, None)
        config = InvertConfig(iterations=warmup, log_every=10**9, save_every=10**9,
                              samples=batch, device="cpu")
        config = config.with_registry_defaults(**vars(spec.leaps))
        inverter = Inverter(model, [0], [torch.rand(1, *model.spec.shape)], config, verifier)
        state = inverter.run()
        inverter.config = replace(config, iterations=warmup + iterations)
        start = time.perf_counter()
        inverter.run(state)
        result["seconds"] = (time.perf_counter() - start) / iterations
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_case(case: str, args: argparse.Namespace) -> dict:
    results = {}
    for what in ("plain_model", "plain_pair", "leaps_other", "leaps_self"):
        proc = subprocess.run([sys.executable, __file__, "--measure", case, what,
                               "--batch", str(args.batch), "--iterations", str(args.iterations),
                               "--warmup", str(args.warmup)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{case}/{what} failed:\n{proc.stderr[-2000:]}")
        results[what] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch, args.iterations, args.warmup)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iterations} timed iterations after {args.warmup} warm-up")
    header = (f"{'case':8} {'verifier':24} {'model s':>8} {'verif s':>8} {'leaps s':>8} "
              f"{'ratio':>6} {'self s':>8} {'ratio':>6} {'mem':>5} {'mem self':>8}")
    print(header)
    for case in args.case or list(CASES):
        r = run_case(case, args)
        m = r["plain_model"]["seconds"]
        pair = r["plain_pair"]["seconds"] + r["plain_pair"]["verifier_seconds"]
        lo, ls = r["leaps_other"]["seconds"], r["leaps_self"]["seconds"]
        mem_other = r["leaps_other"]["peak_mib"] / r["plain_pair"]["peak_mib"]
        mem_self = r["leaps_self"]["peak_mib"] / r["plain_model"]["peak_mib"]
        print(f"{case:8} {r['leaps_other']['verifier']:24} {m:8.3f} "
              f"{r['plain_pair']['verifier_seconds']:8.3f} {lo:8.3f} {lo / pair:6.2f} "
              f"{ls:8.3f} {ls / m:6.2f} {mem_other:5.2f} {mem_self:8.2f}")

if __name__ == "__main__":
    main()
