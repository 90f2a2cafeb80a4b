"""The built-in transformers plugin: conformance, equivalence with transformers' own
from_pretrained on checkpoints written here, the checkpoint forms users have, and the
conformance suite catching the layout mistakes an adapter author can make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from leaps_adapters.transformers_models import (  # noqa: E402
    TimesformerAdapter,
    VideoMAEAdapter,
)

from leaps.adapter import Adapter, InputSpec, Tap, checkpoint_sha256, sha256_file  # noqa: E402
from leaps.errors import LeapsError  # noqa: E402
from leaps.plugins import get_host  # noqa: E402
from leaps.registry import build_model, load_registry  # noqa: E402
from leaps.testing import (  # noqa: E402
    AdapterConformance,
    InProcessPlugin,
    check_checkpoint_round_trip,
    check_lazy_imports,
    check_native_checkpoint,
    check_tap_locality,
    check_taps_cover_blocks,
    reduced_input,
    registered_plugin,
)

MODELS = ["transformers.videomae_b_k400", "transformers.timesformer_b_k400",
          "transformers.vivit_b_k400"]


class TestTransformersConformance(AdapterConformance):
    models: ClassVar[list[str]] = MODELS


def _saved(name: str, folder: Path, classes: int | None = None, **arch: Any
           ) -> tuple[Any, Path]:
    """A randomly initialised reduced model of entry ``name`` (``arch`` overriding), saved by
    transformers' own save_pretrained; returns (the transformers model, the folder)."""
    spec = load_registry().get(name).at_reduced_size()
    adapter = get_host().adapter(spec.adapter)()
    torch.manual_seed(5)
    net = adapter.create({**spec.arch, **arch}, classes or len(spec.label_names()),
                         spec.input_spec(None if classes is None else
                                         tuple(map(str, range(classes))))).eval()
    net.save_pretrained(str(folder))
    return net, folder


def _hf_logits(folder: Path, cls_name: str, model: Any, video: Tensor) -> Tensor:
    hf = getattr(transformers, cls_name).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return hf(pixel_values=model.normalize(video).transpose(1, 2)).logits


@pytest.mark.parametrize("name", MODELS)
def test_save_pretrained_folder_matches_from_pretrained(name: str, tmp_path: Path) -> None:
    _, folder = _saved(name, tmp_path / "ckpt")
    model = build_model(name, reduced=True, checkpoint=folder)
    adapter = get_host().adapter(model.adapter_name)
    video = reduced_input(model)
    with torch.no_grad():
        ours = model(video)
    theirs = _hf_logits(folder, adapter.model_class, model, video)
    assert (ours - theirs).abs().max() < 1e-4
    # the file it loaded is what a run records
    assert checkpoint_sha256(model.adapter_name, folder) == sha256_file(
        folder / "model.safetensors")


def test_lone_files_and_on_disk_key_names(tmp_path: Path) -> None:
    """model.safetensors on its own and a torch.save of the on-disk state dict (q_bias/v_bias
    in transformers 5) load through transformers' own key mapping."""
    name = "transformers.videomae_b_k400"
    net, folder = _saved(name, tmp_path / "ckpt")
    from safetensors.torch import load_file

    on_disk = load_file(str(folder / "model.safetensors"))
    if transformers.__version__.startswith("5"):
        assert any(k.endswith("attention.attention.q_bias") for k in on_disk)
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((folder / "model.safetensors").read_bytes())
    pth = tmp_path / "weights.pth"
    torch.save({"model": on_disk}, pth)
    reference = build_model(name, reduced=True, checkpoint=folder)
    video = reduced_input(reference)
    with torch.no_grad():
        expected = reference(video)
        for path in (lone, pth):
            assert torch.allclose(build_model(name, reduced=True, checkpoint=path)(video),
                                  expected, atol=1e-6)


def test_config_json_sets_the_architecture(tmp_path: Path) -> None:
    """A fine-tune of another size (3 layers of width 48) loads through the entry of its
    family: the folder's config.json, not the registry, gives the architecture."""
    name = "transformers.timesformer_b_k400"
    _, folder = _saved(name, tmp_path / "ckpt", hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=96)
    model = build_model(name, reduced=True, checkpoint=folder)
    assert [t.name for t in model.taps] == [f"timesformer.encoder.layer.{i}" for i in range(3)]
    video = reduced_input(model)
    with torch.no_grad():
        ours = model(video)
    theirs = _hf_logits(folder, "TimesformerForVideoClassification", model, video)
    assert (ours - theirs).abs().max() < 1e-4


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    _, folder = _saved("transformers.vivit_b_k400", tmp_path / "vivit")
    with pytest.raises(LeapsError, match=r"holds a 'vivit' model .*transformers\.vivit"):
        build_model("transformers.videomae_b_k400", reduced=True, checkpoint=folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LeapsError, match=r"holds none of model\.safetensors, pytorch_model\.bin"):
        build_model("transformers.videomae_b_k400", reduced=True, checkpoint=empty)
    config = json.loads((folder / "config.json").read_text())
    config["image_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LeapsError, match=r"config\.json has image_size 64.*input of 4 frames"
                                         r" of 32x32"):
        build_model("transformers.vivit_b_k400", reduced=True, checkpoint=folder)


def test_folder_checkpoint_of_a_single_file_family_says_so(tmp_path: Path) -> None:
    with pytest.raises(LeapsError, match=r"is a folder; torchvision\.r3d loads a file"):
        build_model("torchvision.r3d_18", reduced=True, checkpoint=tmp_path)


# -- the mistakes the conformance suite must catch ---------------------------------------
class SpaceMajorReadAsTimeMajor(TimesformerAdapter):
    name = "mistake.order"
    token_order = "thw"


class HeightWidthSwapped(VideoMAEAdapter):
    name = "mistake.hw"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(t.name, t.module, lambda out, f=t.to_video: f(out).transpose(3, 4))
                for t in super().taps(net, arch, spec)]


class LastBlockOnly(VideoMAEAdapter):
    name = "mistake.last"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return super().taps(net, arch, spec)[-1:]


class ModuleNamesOnly(VideoMAEAdapter):
    """Loads state dicts as they are: the library's on-disk names do not fit."""

    name = "mistake.keys"

    def state_dict_from_checkpoint(self, obj: Any) -> dict[str, Tensor]:
        return obj


def _entry(adapter: type[Adapter], base: str) -> dict[str, Any]:
    spec = load_registry().get(base)
    return {"adapter": adapter.name, "arch": spec.arch,
            "input": {"frames": spec.frames, "size": spec.size, "mean": list(spec.mean),
                      "std": list(spec.std)},
            "labels": ["a", "b", "c"], "verifier": "none",
            "leaps": {"lambda_1": 1.0, "lambda_L": 0.2, "r": 2.5e-3}, "reduced": spec.reduced}


def test_conformance_catches_each_layout_mistake(tmp_path: Path) -> None:
    vm, ts = "transformers.videomae_b_k400", "transformers.timesformer_b_k400"
    plugin = InProcessPlugin(
        [SpaceMajorReadAsTimeMajor, HeightWidthSwapped, LastBlockOnly, ModuleNamesOnly],
        {"mistake.order": _entry(SpaceMajorReadAsTimeMajor, ts),
         "mistake.hw": _entry(HeightWidthSwapped, vm),
         "mistake.last": _entry(LastBlockOnly, vm),
         "mistake.keys": _entry(ModuleNamesOnly, vm)})
    with registered_plugin(plugin, "mistake"):
        with pytest.raises(AssertionError, match=r"laid onto its \[T, H, W\] grid .*wrongly.*"
                                                 r"Token order"):
            check_tap_locality(build_model("mistake.order", reduced=True))
        with pytest.raises(AssertionError, match=r"wrongly.*wrong along h, w.*H/W swap"):
            check_tap_locality(build_model("mistake.hw", reduced=True))
        with pytest.raises(AssertionError, match=r"taps cover only 1 of the 2 VideoMAELayer "
                                                 r"blocks .*untapped: videomae\.encoder\.layer\.0"):
            check_taps_cover_blocks(build_model("mistake.last", reduced=True))
        # its own saver round-trips, so only the library saver's round trip shows the bug
        check_checkpoint_round_trip(load_registry().get("mistake.keys"), tmp_path)
        with pytest.raises(AssertionError, match=r"saved by the library's own saver "
                                                 r"\(save_pretrained\) does not load through "
                                                 r"--checkpoint: .*unexpected: .*q_bias"):
            check_native_checkpoint(load_registry().get("mistake.keys"), tmp_path)


def test_conformance_catches_a_top_level_heavy_import(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "eager_plugin.py").write_text(
        "import transformers  # the mistake: at module level\n"
        "from leaps_adapters.transformers_models import VideoMAEAdapter\n\n\n"
        "class Eager(VideoMAEAdapter):\n    name = 'eager.videomae'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import eager_plugin

    with registered_plugin(InProcessPlugin([eager_plugin.Eager], {}), "eager"):
        with pytest.raises(AssertionError, match=r"importing eager_plugin imports transformers "
                                                 r"at top level"):
            check_lazy_imports("eager.videomae")
    check_lazy_imports("transformers.videomae")  # the built-in one imports it lazily


# -- an outside adapter written against the original contract keeps working -------------
class OutsideVideoMAE(Adapter):
    """What a third-party author wrote before this plugin existed: a one-argument
    state_dict_from_checkpoint that renames keys itself, requires naming a bare package."""

    name = "outside.videomae"
    requires: ClassVar[dict[str, str]] = {"transformers": "transformers"}

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        return VideoMAEForVideoClassification(VideoMAEConfig(
            **arch, image_size=spec.size, num_frames=spec.frames, num_labels=num_classes))

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        from leaps.adapter import tokens_to_video

        config = net.config
        grid = (spec.frames // config.tubelet_size, spec.size // config.patch_size,
                spec.size // config.patch_size)
        return [Tap(f"videomae.encoder.layer.{i}", layer,
                    lambda out: tokens_to_video(out[0] if isinstance(out, tuple) else out, grid))
                for i, layer in enumerate(net.videomae.encoder.layer)]

    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        return net(pixel_values=x.transpose(1, 2)).logits

    def state_dict_from_checkpoint(self, obj: Any) -> dict[str, Tensor]:
        state = super().state_dict_from_checkpoint(obj)
        return {k.replace("attention.attention.q_bias", "attention.attention.query.bias")
                .replace("attention.attention.v_bias", "attention.attention.value.bias"): v
                for k, v in state.items()}


def test_outside_adapter_on_the_original_contract_passes(tmp_path: Path) -> None:
    entry = _entry(OutsideVideoMAE, "transformers.videomae_b_k400")
    with registered_plugin(InProcessPlugin([OutsideVideoMAE], {"outside.videomae": entry}),
                           "outside"):
        model = build_model("outside.videomae", reduced=True)
        check_tap_locality(model)
        check_taps_cover_blocks(model)
        check_checkpoint_round_trip(load_registry().get("outside.videomae"), tmp_path)
        # no library saver of its own: nothing to check, not a failure
        assert check_native_checkpoint(load_registry().get("outside.videomae"), tmp_path) is False
        # its one-argument state_dict_from_checkpoint still loads a save_pretrained folder
        # when it is handed the weights file
        _, folder = _saved("transformers.videomae_b_k400", tmp_path / "ckpt", classes=3)
        build_model("outside.videomae", reduced=True, checkpoint=folder / "model.safetensors")


# -- the command line, end to end, on a save_pretrained folder ---------------------------
def _leaps(*args: str) -> Any:
    """The `leaps` command line in this process (wide enough that rich wraps no line)."""
    from click.testing import CliRunner

    from leaps.cli import cli

    return CliRunner(env={"COLUMNS": "240"}).invoke(cli, list(args), catch_exceptions=False)


def test_cli_invert_explain_layers_evaluate_on_a_folder_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from leaps.video import write_mp4

    classes = ["jumping", "running", "waving"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    _saved("transformers.videomae_b_k400", tmp_path / "ckpt", classes=3)
    (tmp_path / "clips").mkdir()
    generator = torch.Generator().manual_seed(0)
    for name in classes:
        write_mp4(torch.rand(3, 4, 32, 32, generator=generator), tmp_path / "clips" /
                  f"{name}_1.mp4")
    model = ["--model", "transformers.videomae_b_k400", "--checkpoint", "ckpt",
             "--labels", "classes.txt", "--reduced"]
    proc = _leaps("invert", *model, "--target", "all", "--stimuli", "clips", "--out", "run",
                  "--iterations", "3", "--quiet")
    assert proc.exit_code == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["target_names"] == classes
    assert record["stimuli"] == [[f"clips/{c}_1.mp4"] for c in classes]
    assert record["checkpoint_sha256"] == sha256_file(tmp_path / "ckpt" / "model.safetensors")
    proc = _leaps("explain", *model, "--method", "gradcam", "clips/waving_1.mp4", "--out",
                  "explained")
    assert proc.exit_code == 0, proc.stderr
    proc = _leaps("layers", "--model", "transformers.videomae_b_k400", "--checkpoint", "ckpt",
                  "--labels", "classes.txt")
    assert proc.exit_code == 0, proc.stderr
    assert "at the reduced test size" in proc.stdout
    assert "videomae.encoder.layer.1" in proc.stdout
    proc = _leaps("evaluate", "run")
    assert proc.exit_code == 0, proc.stderr
    # a stimuli folder without a target's clip says what is missing and how files are named
    (tmp_path / "clips" / "waving_1.mp4").unlink()
    proc = _leaps("invert", *model, "--target", "waving", "--stimuli", "clips", "--out",
                  "run2", "--iterations", "1", "--quiet")
    assert proc.exit_code == 2 and "clips holds none for waving" in proc.stderr
    assert "<class>_<n>.mp4" in proc.stderr and not (tmp_path / "run2").exists()


def test_class_token_families_default_gradcam_to_a_layer_that_reaches_the_score() -> None:
    for name, layer in (("transformers.timesformer_b_k400", "timesformer.encoder.layer.0"),
                        ("transformers.vivit_b_k400", "vivit.layers.0"),
                        ("transformers.videomae_b_k400", "videomae.encoder.layer.1")):
        assert build_model(name, reduced=True).gradcam_layer == layer


def test_in_process_plugin_takes_either_shape_of_entries() -> None:
    entry = _entry(OutsideVideoMAE, "transformers.videomae_b_k400")
    for models in ({"outside.videomae": entry}, {"models": {"outside.videomae": entry}}):
        with registered_plugin(InProcessPlugin([OutsideVideoMAE], models), "outside"):
            assert load_registry().get("outside.videomae").adapter == "outside.videomae"
