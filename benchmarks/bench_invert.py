"""How close a LEAPS iteration is to the floor: one plain forward+backward of model (+ verifier).

For each case it measures, on the same batch and device:
  plain     seconds of one forward+backward to the input of the model, and of the verifier
  leaps     seconds of one LEAPS iteration (jitter, flip, all terms, Adam step, clamp)
and prints the ratios leaps / (model + verifier) and, for verifier = self, leaps / model,
plus the ratio of peak resident memory. With ``--views K`` a LEAPS iteration runs K augmented
views of each clip as one batch, so the plain forward+backward it is compared with runs the
same K x batch clips: the ratio is per view. ``--param`` picks x*'s parameterisation (its
render is part of the LEAPS iteration); ``--preset`` the rest of the setting (default: the CLI's
default; paper: the paper's objective). Times come from one process that interleaves the four
measurements block by block (each block after one untimed iteration of its own) and takes
medians, so load from other processes hits numerator and denominator alike; each peak-memory
figure comes from a fresh process of its own.

    python benchmarks/bench_invert.py              # all cases, batch 2
    python benchmarks/bench_invert.py --case r3d   # one case
    python benchmarks/bench_invert.py --case demo --param spectrum --views 4
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = {
    # name: (model, verifier, input override (frames, size) or None)
    "x3d_xs": ("pytorchvideo.x3d_xs", None, (4, 160)),
    "r3d": ("torchvision.r3d_18", None, (8, 112)),
    "swin3d": ("torchvision.swin3d_t", None, (8, 112)),
    # the README's main command: a demo model (8x32x32) and its verifier of another family
    "demo": ("demo.resnet3d", None, None),
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


def _setup(case: str, batch: int, views: int = 1):
    from leaps.invert import resample

    model_name, verifier_name, size = CASES[case]
    spec, model = _build(model_name, size)
    model.requires_grad_(False)
    verifier_name = verifier_name or spec.verifier
    x = torch.rand((batch * views, *model.spec.shape), requires_grad=True)
    target = torch.zeros(batch * views, dtype=torch.long)

    def plain(net):
        def step():
            x.grad = None
            view = resample(x, net.spec.frames, net.spec.size)
            torch.nn.functional.cross_entropy(net(view), target).backward()
        return step

    return spec, model, verifier_name, plain


def _inverter(spec, model, verifier, batch: int, warmup: int, options: dict):
    from leaps.invert import InvertConfig, Inverter

    config = InvertConfig.from_preset(**options, iterations=warmup, log_every=10**9,
                                      save_every=10**9, samples=batch, device="cpu")
    config = config.with_registry_defaults(**vars(spec.leaps))
    inverter = Inverter(model, [0], [torch.rand(1, *model.spec.shape)], config, verifier)
    return inverter, inverter.run()


def measure_time(case: str, batch: int, iterations: int, warmup: int, rounds: int,
                 options: dict) -> dict:
    """All four timings in ONE process, interleaved block by block (median over rounds), so
    that load from other processes hits numerator and denominator alike."""
    from dataclasses import replace

    spec, model, verifier_name, plain = _setup(case, batch, options["views"])
    _, verifier = _build(verifier_name, None)
    verifier.requires_grad_(False)
    # Each measurement has networks of its own: an inverter's hooks (and the last step's
    # statistics they hold) stay on the networks it was given, and would otherwise run, and
    # weigh, in the other measurements' forwards.
    leaps_other, other_state = _inverter(spec, copy.deepcopy(model), copy.deepcopy(verifier),
                                         batch, warmup, options)
    leaps_self, self_state = _inverter(spec, copy.deepcopy(model), "self", batch, warmup, options)
    states = {"other": other_state, "self": self_state}

    def leaps_block(inverter, key):
        def block(count: int):
            state = states[key]
            inverter.config = replace(inverter.config, iterations=state.step + count)
            states[key] = inverter.run(state)
        return block

    def plain_block(net):
        step = plain(net)

        def block(count: int):
            for _ in range(count):
                step()
        return block

    blocks = {"model": plain_block(model), "verifier": plain_block(verifier),
              "leaps_other": leaps_block(leaps_other, "other"),
              "leaps_self": leaps_block(leaps_self, "self")}
    for block in blocks.values():  # warm-up
        block(iterations)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        for name, block in blocks.items():
            # One untimed iteration first: the first after another measurement (a larger model
            # before it) pays for that one's cache and page misses, which are not this one's.
            block(1)
            start = time.perf_counter()
            block(iterations)
            times[name].append((time.perf_counter() - start) / iterations)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["verifier_name"] = verifier_name
    return result


def measure_memory(case: str, what: str, batch: int, iterations: int, warmup: int,
                   options: dict) -> dict:
    """Peak resident memory of one configuration, alone in a fresh process.

    plain_model: model fwd+bwd; plain_pair: model and verifier fwd+bwd (both loaded);
    leaps_other / leaps_self: LEAPS iterations with the verifier / with verifier = self.
    """
    spec, model, verifier_name, plain = _setup(case, batch, options["views"])
    if what in ("plain_model", "plain_pair"):
        nets = [model]
        if what == "plain_pair":
            _, verifier = _build(verifier_name, None)
            verifier.requires_grad_(False)
            nets.append(verifier)
        for net in nets:
            _time(plain(net), iterations, warmup)
    else:
        verifier = "self" if what == "leaps_self" else _build(verifier_name, None)[1]
        _inverter(spec, model, verifier, batch, warmup + iterations, options)
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _subprocess(args: argparse.Namespace, *measure: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", *measure,
                           "--batch", str(args.batch), "--iterations", str(args.iterations),
                           "--warmup", str(args.warmup), "--rounds", str(args.rounds),
                           "--options", json.dumps(_options(args))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(measure)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _options(args: argparse.Namespace) -> dict:
    """The InvertConfig settings measured: the preset's, with --param/--views over them."""
    from leaps.config import InvertConfig

    preset = InvertConfig.from_preset(args.preset)
    return {"preset": args.preset, "param": args.param or preset.param,
            "views": args.views or preset.views}


def run_case(case: str, args: argparse.Namespace) -> dict:
    results = {"time": _subprocess(args, case, "time")}
    for what in ("plain_model", "plain_pair", "leaps_other", "leaps_self"):
        results[what] = _subprocess(args, case, what)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2, help="iterations per timed block")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--preset", default="default", choices=["default", "paper"])
    parser.add_argument("--param", choices=["pixels", "spectrum", "warp"],
                        help="x*'s parameterisation [default: the preset's]")
    parser.add_argument("--views", type=int, help="augmented views per step (K) [default: the "
                        "preset's]")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        case, what = args.measure
        options = json.loads(args.options)
        result = (measure_time(case, args.batch, args.iterations, args.warmup, args.rounds,
                               options)
                  if what == "time" else
                  measure_memory(case, what, args.batch, args.iterations, args.warmup, options))
        print(json.dumps(result))
        return
    options = _options(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"preset {options['preset']}: x* {options['param']}, {options['views']} view(s) per "
          f"step (plain: {options['views']} x batch clips), median of {args.rounds} interleaved "
          f"rounds of {args.iterations} iterations")
    print(f"{'case':8} {'verifier':24} {'model s':>8} {'verif s':>8} {'leaps s':>8} "
          f"{'ratio':>6} {'self s':>8} {'ratio':>6} {'mem':>5} {'mem self':>8}")
    for case in args.case or list(CASES):
        r = run_case(case, args)
        t = r["time"]
        pair = t["model"] + t["verifier"]
        mem_other = r["leaps_other"]["peak_mib"] / r["plain_pair"]["peak_mib"]
        mem_self = r["leaps_self"]["peak_mib"] / r["plain_model"]["peak_mib"]
        print(f"{case:8} {t['verifier_name']:24} {t['model']:8.3f} {t['verifier']:8.3f} "
              f"{t['leaps_other']:8.3f} {t['leaps_other'] / pair:6.2f} {t['leaps_self']:8.3f} "
              f"{t['leaps_self'] / t['model']:6.2f} {mem_other:5.2f} {mem_self:8.2f}")


if __name__ == "__main__":
    main()
