"""The bundled demo zoo: shipped weights and stimuli that work offline, reproducible training."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from leaps.cli import cli
from leaps.datasets import make_dataset
from leaps.demo import STIMULI_PER_CLASS, ZOO, TrainRecipe, accuracy_per_class, demo_models, train
from leaps.registry import build_model, load_registry
from leaps.video import read_clip

DEMO = demo_models()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_zoo_has_several_families_each_verified_by_another():
    registry = load_registry()
    adapters = {registry.get(name).adapter for name in DEMO}
    assert len(DEMO) >= 3 and len(adapters) == len(DEMO)
    for name in DEMO:
        spec = registry.get(name)
        assert spec.verifier in DEMO and registry.get(spec.verifier).adapter != spec.adapter


def _record(name: str) -> dict:
    return json.loads((ZOO / f"{name}.json").read_text())


def test_shipped_weights_are_small_and_match_their_training_records():
    from leaps.adapter import sha256_file

    total = 0
    for name in DEMO:
        weights = load_registry().get(name).checkpoint_path()
        assert _record(name)["sha256"] == sha256_file(weights), name
        total += weights.stat().st_size
    assert total < 20 * 2**20, total


@pytest.mark.parametrize("name", DEMO)
def test_demo_models_recognise_fresh_clips(name):
    """Held-out clips from a seed neither training nor validation used."""
    model = build_model(name)  # the shipped weights load by default
    spec = model.spec
    videos, labels, _ = make_dataset(12, spec.frames, spec.size, seed=424242,
                                     classes=model.labels)
    per_class = dict(zip(model.labels, accuracy_per_class(model, videos, labels,
                                                          len(model.labels))))
    recorded = _record(name)["validation"]
    # as good on fresh clips as its training record says (96 clips: +-4 points of noise) ...
    assert abs(sum(per_class.values()) / 8 - recorded["accuracy"]) <= 0.06, per_class
    # ... and every translation and scale class is recognised; the rotation pair is where
    # some demo models fall short (their records say by how much)
    assert all(per_class[c] >= 0.9 for c in ("left", "right", "up", "down", "grow", "shrink")), \
        per_class


def test_bundled_stimuli_are_real_videos_the_demo_models_recognise():
    """The README's main command primes demo.resnet3d with these: it recognises nearly every
    one (62 of 64: two clockwise clips are read as another class); the other demo models
    recognise nearly all translation and scale stimuli (the rotation pair is where they fall
    short, see their training records)."""
    spec = load_registry().get("demo.resnet3d")
    models = {name: build_model(name) for name in DEMO}
    labels = models["demo.resnet3d"].labels
    right = {name: [] for name in DEMO}
    for label in labels:
        files = spec.stimulus_files(label)
        assert len(files) == STIMULI_PER_CLASS and all(f.suffix == ".mp4" for f in files), label
        clips = torch.stack([read_clip(f, spec.frames, spec.size) for f in files])
        with torch.no_grad():
            for name, model in models.items():
                if name == "demo.resnet3d" or "wise" not in label:
                    right[name] += [labels[p] == label for p in model(clips).argmax(1).tolist()]
    own = right["demo.resnet3d"]
    assert len(own) == STIMULI_PER_CLASS * len(labels) and sum(own) / len(own) >= 0.95
    for name, hits in right.items():
        assert sum(hits) / len(hits) >= 0.9, (name, hits)


def test_training_is_reproducible_from_the_seed():
    recipe = TrainRecipe(epochs=1, clips_per_class=4, validation_clips_per_class=2, seed=5)
    first, record = train("demo.r2plus1d", recipe)
    second, _ = train("demo.r2plus1d", recipe)
    for (key, a), b in zip(first.net.state_dict().items(), second.net.state_dict().values()):
        assert torch.equal(a, b), key
    assert record["epochs_trained"] == 1 and 0 <= record["validation"]["accuracy"] <= 1


def test_train_demo_command_writes_a_loadable_zoo(tmp_path):
    result = CliRunner().invoke(cli, ["train-demo", "--model", "demo.r2plus1d", "--epochs", "1",
                                      "--clips-per-class", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "demo.r2plus1d.safetensors"
    record = json.loads((tmp_path / "demo.r2plus1d.json").read_text())
    assert record["weights"] == weights.name and record["recipe"]["clips_per_class"] == 2
    model = build_model("demo.r2plus1d", checkpoint=weights)
    state = load_file(str(weights))
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in state.items())
    stimuli = sorted((tmp_path / "stimuli").glob("*.mp4"))
    assert len(stimuli) == STIMULI_PER_CLASS * len(model.labels)
    assert read_clip(stimuli[0], 8, 32).shape == (3, 8, 32, 32)
    bad = CliRunner().invoke(cli, ["train-demo", "--model", "torchvision.r3d_18", "--out",
                                   str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a demo model" in bad.output
    assert not (tmp_path / "x").exists()
