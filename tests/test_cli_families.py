"""The command line across model families: `leaps invert` runs end to end for one model of each
built-in family (at the reduced size, a few iterations; with random weights the clips mean
nothing, what is checked is the plumbing from the CLI through the adapter to the run directory),
and `leaps layers` works for every registry entry."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from leaps.cli import cli
from leaps.datasets import make_dataset
from leaps.registry import build_model, load_registry, missing_requirements
from leaps.video import write_mp4

# pytorchvideo 0.1.5's own deprecated calls (its Swish autograd function, its torch.jit use).
pytestmark = [pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

ITERATIONS = 3

# One model of each family, picked by the options a user would type; the verifiers cover every
# kind: the model itself, none, a BatchNorm network of another family, and a BN-free one of
# another family (whose statistics are estimated from the stimulus).
FAMILIES = [
    pytest.param(["--model", "torchvision.r3d_18", "--verifier", "self"],
                 "torchvision.r3d", "torchvision.r3d_18", "self", id="torchvision"),
    pytest.param(["--model", "pytorchvideo.x3d_xs", "--verifier", "mmaction.swin_t"],
                 "pytorchvideo.x3d", "pytorchvideo.x3d_xs", "mmaction.swin_t", id="pytorchvideo"),
    # As the product promises it: an adapter name alone picks its default entry.
    pytest.param(["--adapter", "mmaction.swin", "--verifier", "none"],
                 "mmaction.swin", "mmaction.swin_t", "none", id="mmaction"),
    # No --verifier: the registry's default, torchvision.r3d_18.
    pytest.param(["--model", "timm.resnet18_frames"],
                 "timm.frames", "timm.resnet18_frames", "torchvision.r3d_18", id="timm"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Reduced models have tiny tensors: intra-op threads only add overhead on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stimulus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real encoded clip (a shape moving left over a noisy background)."""
    videos, _, _ = make_dataset(1, classes=("left",), seed=11)
    return write_mp4(videos[0], tmp_path_factory.mktemp("stimuli") / "left.mp4")


def leaps(*args: str) -> Result:
    """Run the `leaps` command line in this process (wide enough that rich wraps no line)."""
    return CliRunner(env={"COLUMNS": "240"}).invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize(("selection", "adapter", "model", "verifier"), FAMILIES)
def test_short_inversion_through_the_cli(selection: list[str], adapter: str, model: str,
                                         verifier: str, stimulus: Path, tmp_path: Path) -> None:
    spec = load_registry().get(model).at_reduced_size()
    out = tmp_path / "run"
    result = leaps("invert", *selection, "--reduced", "--target", "abseiling",
                   "--stimulus", str(stimulus), "--iterations", str(ITERATIONS),
                   "--log-every", "1", "--seed", "3", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{out}: 1 clip(s) of abseiling")

    record = json.loads((out / "run.json").read_text())
    assert (record["adapter"], record["model"], record["verifier"]) == (adapter, model, verifier)
    assert record["status"] == "done" and record["steps"] == ITERATIONS and record["reduced"]
    assert record["target_names"] == ["abseiling"] and record["stimuli"] == [[str(stimulus)]]
    assert record["input"] == {"frames": spec.frames, "size": spec.size}
    # LEAPS primes every tap of the model, first block to last.
    taps = [tap.name for tap in build_model(model, reduced=True).taps]
    assert record["primed_taps"] == taps
    history = record["history"]
    assert all(len(values) == ITERATIONS for values in history.values())
    assert all(math.isfinite(v) for values in history.values() for v in values)
    # The verifier took part: R_feat is non-zero with one, and there is no verifier verdict
    # without one.
    assert (max(history["feature"]) > 0) == (verifier != "none")
    assert ("verifier_accuracy" in record["metrics"]) == (verifier != "none")

    video = torch.load(out / "video.pt", weights_only=True)
    assert video.shape == (1, 3, spec.frames, spec.size, spec.size)
    assert 0 <= video.min() and video.max() <= 1
    # run.json lists every file of the run (and the resumable state is gone once it is done).
    written = {p.name for p in out.iterdir()}
    assert written == {"run.json", *record["files"]}
    assert {"video.pt", "grid.png", "loss.png", "sample_0_abseiling.gif",
            "sample_0_abseiling.mp4"} <= written
    with Image.open(out / "sample_0_abseiling.gif") as gif:
        assert gif.n_frames == spec.frames
    with Image.open(out / "grid.png") as grid:
        grid.verify()


# -- `leaps layers` for every registry entry ---------------------------------------------
ENTRIES = sorted(load_registry().models)


@pytest.mark.parametrize("name", ENTRIES)
def test_layers_works_for_every_entry(name: str) -> None:
    """Usable entries print their taps (one [1, C, T, H, W] row each, the Grad-CAM target
    among them); an entry no installed library can build says why, on one line."""
    result = leaps("layers", "--model", name)
    reason = missing_requirements(load_registry().get(name))
    if reason is not None:
        assert result.exit_code == 2
        assert result.stderr == f"error: model {name!r} is not usable here: {reason}\n"
        return
    assert result.exit_code == 0, result.stderr
    spec = load_registry().get(name).at_reduced_size()
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{name} (adapter {spec.adapter}) at the reduced test size"), first
    assert f"input 1x3x{spec.frames}x{spec.size}x{spec.size}" in first, first
    count = int(re.search(r"taps \((\d+)\)", result.stdout).group(1))
    rows = re.findall(r"│ *\d+ *│ *(\S+) *│ *\S+ *│ *\[1, \d+, \d+, \d+, \d+\] *│", result.stdout)
    assert count >= 1 and len(rows) == count, result.stdout
    assert re.search(r"Grad-CAM target: (\S+)", result.stdout).group(1) in rows
