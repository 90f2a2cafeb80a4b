"""x*'s parameterisations (leaps/params.py), augmentation views, presets and several verifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leaps import params, runs
from leaps.config import InvertConfig
from leaps.errors import LeapsError
from leaps.invert import Inverter, invert
from leaps.registry import build_model
from leaps.testing import Conv3DStack, InProcessPlugin, motion_entry, registered_plugin

CLASSES = ("left", "right", "up", "down")
MODEL = "testparams.tiny3d"
PLUGIN = InProcessPlugin([Conv3DStack], {MODEL: motion_entry(
    CLASSES, [[8, [1, 2, 2]], [16, [2, 2, 2]], [16, [1, 1, 1]]],
    mirrors=[["left", "right"]])})
SHAPE = (2, 3, 8, 32, 32)
FIXTURE = Path(__file__).parent / "data" / "paper_preset_demo.resnet3d_grow_seed3_10it.pt"


@pytest.fixture(scope="module")
def models():
    """Three untrained networks of the same label set (seeded initialisations 0, 1, 2)."""
    built = []
    with registered_plugin(PLUGIN, "testparams"):
        for seed in range(3):
            torch.manual_seed(seed)
            built.append(build_model(MODEL))
    return built


@pytest.fixture(scope="module")
def tiny(models):
    return models[0]


def stimuli(count: int = 2, contrast: float = 0.4, seed: int = 0) -> list[torch.Tensor]:
    """``count`` targets' stimuli ``[2, 3, 8, 32, 32]``: smooth random clips around 0.5."""
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(count):
        coarse = torch.rand((2, 3, 4, 8, 8), generator=generator) - 0.5
        clip = torch.nn.functional.interpolate(coarse, size=SHAPE[2:], mode="trilinear")
        clips.append(0.5 + contrast * clip)
    return clips


def config(**overrides) -> InvertConfig:
    """The CLI's defaults (spectrum per class, verifier CE) with a short run."""
    return InvertConfig(**{"iterations": 12, "lr": 0.1, "log_every": 3, "save_every": 3,
                           "lambda_1": 1.0, "lambda_L": 0.2, "r": 1e-3, **overrides})


@pytest.mark.parametrize("name", ["pixels", "spectrum", "warp"])
def test_every_parameterisation_renders_clips_in_range_with_gradients(name):
    p = params.build(name, SHAPE, stimuli(), samples=1)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    param = p.init(generators).requires_grad_(True)
    clip = p.render(param)
    assert clip.shape == SHAPE
    assert 0 <= float(clip.detach().min()) and float(clip.detach().max()) <= 1
    clip.mean().backward()
    assert param.grad is not None and float(param.grad.abs().sum()) > 0
    # Each clip's initial parameter comes from its own generator, whatever else is drawn.
    again = p.init([torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = p.init([torch.Generator().manual_seed(2)])
    assert torch.equal(alone[0], again[1])


def test_spectrum_keeps_the_stimuli_amplitude_spectrum_and_only_moves_the_phase():
    given = stimuli(contrast=0.2)  # low contrast: the rendered clip is never clamped
    p = params.build("spectrum", SHAPE, given, samples=1)
    magnitude, mean = params.amplitude_spectrum(torch.cat(given))
    param = p.init([torch.Generator().manual_seed(s) for s in (3, 4)])
    clip = p.render(param)
    assert 0 < float(clip.min()) and float(clip.max()) < 1
    measured = torch.fft.rfftn(clip - mean, dim=(-3, -2, -1), norm="ortho").abs()
    # Every frequency but the last axis' 0 and Nyquist planes, where a real clip's spectrum is
    # its own conjugate mirror (irfft keeps only the Hermitian part of a random phase there).
    inner = (..., slice(1, -1))
    assert torch.allclose(measured[inner], magnitude.expand_as(measured)[inner], atol=1e-4)
    # Per class: each target's clip keeps its own class's spectrum.
    per_class = params.build("spectrum", SHAPE, given, samples=1, source="class")
    second, _ = params.amplitude_spectrum(given[1])
    clip = per_class.render(param)
    measured = torch.fft.rfftn(clip[1] - clip[1].mean(dim=(1, 2, 3), keepdim=True),
                               dim=(-3, -2, -1), norm="ortho").abs()
    assert torch.allclose(measured[inner], second[inner], atol=1e-4)


def test_the_spectrum_carries_the_stimuli_mean_energy():
    """The amplitude is the root of the stimuli's mean power: a clip under it has the stimuli's
    mean energy at the frequencies it sets freely (a mean of amplitudes falls short)."""
    given = stimuli(contrast=0.2)
    both = torch.cat(given)
    p = params.build("spectrum", SHAPE, given, samples=1)
    clip = p.render(p.init([torch.Generator().manual_seed(s) for s in (7, 8)]))
    _, mean = params.amplitude_spectrum(both)
    inner = (..., slice(1, -1))  # as above: not the self-conjugate planes

    def energy(clips):
        return torch.fft.rfftn(clips - mean, dim=(-3, -2, -1), norm="ortho").abs()[inner]

    expected = energy(both).square().sum(dim=(1, 2, 3, 4)).mean()
    assert torch.allclose(energy(clip).square().sum(dim=(1, 2, 3, 4)), expected.expand(2),
                          rtol=1e-4)
    assert float(energy(both).mean(dim=0).square().sum()) < 0.9 * float(expected)


def test_without_stimuli_the_spectrum_is_natural_at_the_model_normalisation():
    """No stimuli (priming off): 1/f amplitude, and clips with the model's input mean and std."""
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.15, 0.1)
    magnitude, means = params.natural_spectrum((8, 32, 32), mean, std)
    # 1/|f|: the amplitude halves from 2 to 4 cycles per clip along H, at any channel.
    assert torch.allclose(magnitude[:, 0, 2, 0] / magnitude[:, 0, 4, 0], torch.tensor(2.0))
    assert float(magnitude[:, 0, 0, 0].abs().max()) == 0  # no DC: the mean is separate
    p = params.build("spectrum", (16, 3, 8, 32, 32), [], samples=1, normalisation=(mean, std))
    clips = p.render(p.init([torch.Generator().manual_seed(s) for s in range(16)]))
    per_channel = clips.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(dim=1), torch.tensor(mean), atol=0.02)
    assert torch.allclose(per_channel.std(dim=1), torch.tensor(std), rtol=0.15)
    warp = params.build("warp", (2, 3, 8, 32, 32), [], samples=1, normalisation=(mean, std))
    still = warp.render(warp.init([torch.Generator().manual_seed(s) for s in (1, 2)]))
    assert still.shape == (2, 3, 8, 32, 32) and 0 < float(still.std()) < 0.5
    with pytest.raises(LeapsError, match="--init stimulus"):
        params.check_stimuli("spectrum", "stimulus", [])


def test_warp_moves_one_image_by_its_flows():
    p = params.build("warp", SHAPE, stimuli(), samples=1, grid=3)
    param = p.init([torch.Generator().manual_seed(s) for s in (5, 6)])
    still = p.render(param)
    assert torch.equal(still[:, :, 0], still[:, :, -1])  # zero flows: one still image
    moved = param.clone()
    moved[:, p.image_numel:] = 2.0  # every frame shifted 2 pixels right and down
    clip = p.render(moved)
    assert not torch.allclose(clip[:, :, 0], still[:, :, 0], atol=1e-3)
    assert torch.allclose(clip[:, :, 0, 8:24, 8:24], still[:, :, 0, 10:26, 10:26], atol=1e-4)


@pytest.mark.parametrize("options", [
    {"param": "spectrum", "lr": 0.5, "views": 3, "crop": 0.6, "noise": 0.05, "time_shift": 1},
    {"param": "warp", "lr": 0.05, "views": 2, "crop": 0.7, "spectrum_source": "class"},
])
def test_resume_is_bit_identical_with_every_augmentation(tiny, tmp_path, options):
    clips = stimuli()
    setting = config(**options)
    whole = Inverter(tiny, [0, 2], clips, setting, "self").run()

    def interrupt(step, _terms):
        if step == 6:
            raise KeyboardInterrupt

    first = Inverter(tiny, [0, 2], clips, setting, "self")
    with pytest.raises(KeyboardInterrupt):
        first.run(on_log=interrupt, on_save=lambda s: runs.write_state(tmp_path / "s.pt", s))
    first.close()
    state = runs.read_state(tmp_path / "s.pt")
    assert state.step == 6
    resumed = Inverter(tiny, [0, 2], clips, setting, "self").run(state)
    assert torch.equal(resumed.param, whole.param)
    assert resumed.history == whole.history


def test_views_average_the_objective_over_augmented_copies(tiny):
    clips = stimuli()
    inverter = Inverter(tiny, [0, 2], clips, config(views=4, crop=0.5, noise=0.1,
                                                    time_shift=2), "self",
                        mirrors=[("left", "right")])
    import random

    clip = torch.rand(SHAPE)
    batch, swapped = inverter.views(clip, 4, random.Random(0))
    assert batch.shape == (8, *SHAPE[1:])
    # some views flipped with their target swapped, some not: a mask, one value per view
    assert swapped.shape == (8,) and swapped.dtype == torch.bool
    per_view = swapped.view(4, 2)
    assert per_view.any() and not per_view.all()
    assert torch.equal(per_view.all(dim=1), per_view.any(dim=1))
    # Different views of the same clip differ (crop, noise, shift, roll).
    assert not torch.allclose(batch[:2], batch[2:4])
    terms = inverter.objective(batch, swapped)
    assert terms["total"].ndim == 0 and torch.isfinite(terms["total"])
    # views all alike come as one bool: the same objective as its mask
    for value in (False, True):
        mask = torch.full((8,), value)
        assert torch.equal(inverter.objective(batch, value)["total"],
                           inverter.objective(batch, mask)["total"])


def test_several_verifiers_each_give_r_feat_and_their_cross_entropy(models):
    tiny, other, third = models
    clips = stimuli()
    without = Inverter(tiny, [0, 2], clips, config(iterations=3, verifier_ce_weight=0.0),
                       [other, third]).run()
    assert without.history["verifier_ce"] == [0.0, 0.0, 0.0]
    inverter = Inverter(tiny, [0, 2], clips, config(iterations=3, verifier_ce_weight=1.0),
                        [other, third])
    assert len(inverter.norm_recorders) == 2 and inverter.ce_verifiers == [0, 1]
    result = inverter.run()
    assert all(v > 0 for v in result.history["verifier_ce"])
    # The verifiers' CE is part of the total: a different clip than without it.
    assert not torch.equal(result.param, without.param)


def test_presets_and_their_overrides():
    assert InvertConfig.from_preset("paper").param == "pixels"
    assert InvertConfig.from_preset("paper", lr=0.3).lr == 0.3
    assert InvertConfig.from_preset().preset == "default"
    with pytest.raises(LeapsError, match="preset"):
        InvertConfig.from_preset("fast")
    with pytest.raises(LeapsError, match="--views"):
        InvertConfig(views=0).validate()
    with pytest.raises(LeapsError, match="--param"):
        InvertConfig(param="fourier").validate()


def test_the_paper_preset_reproduces_the_paper_objective_clip_for_clip():
    """``--preset paper`` is the paper's setting exactly: the same clip as before x* had
    parameterisations (tests/data: written by the pixel-only code, demo.resnet3d, grow, seed 3,
    10 steps, primed by the two stimuli the zoo held then)."""
    torch.set_num_threads(2)
    zoo = Path(__file__).parents[1] / "leaps" / "zoo" / "stimuli"
    result = invert("demo.resnet3d", targets=["grow"], progress=False,
                    stimuli=[f"grow={zoo / 'grow_0.mp4'}", f"grow={zoo / 'grow_1.mp4'}"],
                    config=InvertConfig.from_preset("paper", iterations=10, seed=3))
    expected = torch.load(FIXTURE, weights_only=True)
    assert torch.allclose(result.video, expected, atol=1e-4)


def test_cli_takes_a_parameterisation_views_and_several_verifiers(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "leaps.cli", "invert", "--model", "demo.resnet3d",
         "--target", "grow", "--iterations", "3", "--param", "spectrum", "--views", "2",
         "--crop", "0.8",
         "--verifier", "demo.x3d", "--verifier", "self", "--verifier-ce-weight", "0.5",
         "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["verifiers"] == ["demo.x3d", "self"] and record["verifier"] == "demo.x3d"
    assert record["config"]["param"] == "spectrum" and record["config"]["views"] == 2
    bad = subprocess.run([sys.executable, "-m", "leaps.cli", "invert", "--model", "demo.resnet3d",
                          "--target", "grow", "--param", "fourier", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


def test_init_stimulus_starts_from_a_stimulus_of_the_class(tiny):
    given = stimuli(contrast=0.2)
    # Pixels start exactly at the stimulus; a spectrum of that stimulus alone, at it too.
    inverter = Inverter(tiny, [0, 2], given, config(init="stimulus", param="pixels"), "self")
    start = inverter.render(inverter.initial_state([4, 7]).param)
    assert torch.equal(start[0], given[0][0]) and torch.equal(start[1], given[1][1])
    one = [g[:1] for g in given]
    spectral = params.build("spectrum", SHAPE, one, samples=1, source="class")
    clip = spectral.render(spectral.encode(torch.cat(one)))
    assert torch.allclose(clip, torch.cat(one), atol=1e-4)
    with pytest.raises(LeapsError, match="--init stimulus"):
        Inverter(tiny, [0], [], config(init="stimulus", priming_weight=0.0, param="pixels"),
                 "self").initial_state()
