"""The pytorchvideo adapters: every registry entry passes the conformance suite; each family
computes the same logits as the model built pytorchvideo's own way; the registry's arch is the
hub builder's; pytorchvideo's hub checkpoint format loads, and bad checkpoints fail clearly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from leaps.errors import LeapsError
from leaps.registry import build_model, load_registry
from leaps.testing import AdapterConformance

pytest.importorskip("pytorchvideo")
# pytorchvideo 0.1.5's own deprecated calls (its Swish autograd function, its torch.jit use).
pytestmark = [pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

# Every entry built by a pytorchvideo adapter (the demo zoo's included) passes conformance;
# the Kinetics-400 ones are pytorchvideo's model zoo, each with its hub builder.
PYTORCHVIDEO = [name for name, spec in load_registry().models.items()
                if spec.adapter.startswith("pytorchvideo.")]
KINETICS = [name for name in PYTORCHVIDEO if load_registry().get(name).labels == "kinetics400"]

# Registry entry -> the pytorchvideo.models.hub builder of the same model.
HUB = {
    "pytorchvideo.x3d_xs": "x3d_xs",
    "pytorchvideo.x3d_s": "x3d_s",
    "pytorchvideo.x3d_m": "x3d_m",
    "pytorchvideo.x3d_l": "x3d_l",
    "pytorchvideo.slow_r50": "slow_r50",
    "pytorchvideo.r2plus1d_r50": "r2plus1d_r50",
    "pytorchvideo.csn_r101": "csn_r101",
    "pytorchvideo.slowfast_r50": "slowfast_r50",
    "pytorchvideo.mvit_base_16x4": "mvit_base_16x4",
    "pytorchvideo.mvit_base_32x3": "mvit_base_32x3",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Reduced models have tiny tensors, so intra-op threads only add overhead; on a shared
    2-core machine OpenMP's waiting workers made the per-tap backward passes of the
    conformance suite 10-20x slower (X3D-L: 7 s with one thread, 138 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestPytorchvideoConformance(AdapterConformance):
    models = PYTORCHVIDEO


def test_every_kinetics_entry_has_its_hub_builder() -> None:
    assert sorted(KINETICS) == sorted(HUB)


@pytest.mark.parametrize("name", sorted(HUB))
def test_full_size_network_is_the_hub_builders(name: str) -> None:
    """At full size the entry builds exactly the hub's network (asked for logits): the same
    modules and hyperparameters, and - from the same seed - the same initial weights."""
    from pytorchvideo.models import hub

    torch.manual_seed(0)
    ours = build_model(name).net
    torch.manual_seed(0)
    theirs = getattr(hub, HUB[name])(pretrained=False, head_activation=None)
    assert repr(ours) == repr(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{name}: initial weights differ from the hub's: {different[:5]}"


# -- equivalence with pytorchvideo's own way of building and feeding each family ------------
def _peers() -> dict[str, Callable[[], nn.Module]]:
    """One entry per adapter family, built at its reduced size as a pytorchvideo user would."""
    from pytorchvideo.models import hub
    from pytorchvideo.models.csn import create_csn
    from pytorchvideo.models.resnet import create_resnet
    from pytorchvideo.models.x3d import create_x3d

    return {
        "pytorchvideo.x3d_xs": lambda: create_x3d(input_clip_length=4, input_crop_size=64),
        "pytorchvideo.slow_r50": lambda: create_resnet(
            stem_conv_kernel_size=(1, 7, 7), head_pool_kernel_size=(4, 2, 2), model_depth=50),
        "pytorchvideo.r2plus1d_r50": lambda: hub.r2plus1d_r50(
            pretrained=False, head_pool_kernel_size=(1, 2, 2)),
        "pytorchvideo.csn_r101": lambda: create_csn(
            model_depth=101, stem_pool=nn.MaxPool3d, head_pool_kernel_size=(1, 2, 2)),
        "pytorchvideo.slowfast_r50": lambda: hub.slowfast_r50(
            pretrained=False, head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2))),
        "pytorchvideo.mvit_base_16x4": lambda: hub.mvit_base_16x4(
            pretrained=False, spatial_size=64, temporal_size=4),
    }


PEER_NAMES = ["pytorchvideo.x3d_xs", "pytorchvideo.slow_r50", "pytorchvideo.r2plus1d_r50",
              "pytorchvideo.csn_r101", "pytorchvideo.slowfast_r50", "pytorchvideo.mvit_base_16x4"]


def _randomize(net: nn.Module) -> None:
    """Non-trivial norm parameters and statistics (pytorchvideo zero-initialises the last BN of
    every residual branch, which would hide the branches from the comparison)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _head(net: nn.Module) -> nn.Module:
    return net.head if hasattr(net, "head") else net.blocks[-1]


def _peer_logits(peer: nn.Module, inputs: Any) -> tuple[Tensor, Tensor]:
    """(the peer's output, its logits: the head's projection averaged over positions)."""
    captured: list[Tensor] = []
    handle = _head(peer).proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            output = peer(inputs)
    finally:
        handle.remove()
    projection = captured[0]
    logits = projection.flatten(1, -2).mean(1) if projection.dim() > 2 else projection
    return output, logits


@pytest.mark.parametrize("name", PEER_NAMES)
def test_logits_equal_pytorchvideos_own_model(name: str, tmp_path: Path) -> None:
    spec = load_registry().get(name)
    torch.manual_seed(0)
    peer = _peers()[name]().eval()
    _randomize(peer)
    path = tmp_path / "model.pyth"
    torch.save({"model_state": peer.state_dict()}, path)
    peer.load_state_dict(torch.load(path, weights_only=True)["model_state"])

    ours = build_model(name, reduced=True, checkpoint=path)
    clip = torch.rand((2, *ours.spec.shape), generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1, 1)
    normalised = (clip - mean) / std
    if name == "pytorchvideo.slowfast_r50":
        # pytorchvideo's PackPathway recipe (alpha = 4), on the batch's time axis.
        frames = normalised.shape[2]
        slow = torch.index_select(normalised, 2,
                                  torch.linspace(0, frames - 1, frames // 4).long())
        inputs: Any = [slow, normalised]
    else:
        inputs = normalised
    with torch.no_grad():
        logits = ours(clip)
    output, peer_logits = _peer_logits(peer, inputs)
    assert (logits - peer_logits).abs().max() <= 1e-4
    if _head(peer).activation is None:
        assert (logits - output).abs().max() <= 1e-4
    else:
        # pytorchvideo's X3D and R(2+1)D heads end in a softmax; leaps keeps the logits.
        assert (logits.softmax(1) - output).abs().max() <= 1e-6


def test_slowfast_tap_keeps_each_pathways_channel_means() -> None:
    from leaps_adapters.pytorchvideo_models import merge_pathways

    slow, fast = torch.randn(2, 5, 2, 3, 3), torch.randn(2, 4, 8, 3, 3)
    merged = merge_pathways([slow, fast])
    assert merged.shape == (2, 9, 2, 3, 3)
    expected = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], dim=1)
    assert torch.allclose(merged.mean((2, 3, 4)), expected, atol=1e-6)


# -- pytorchvideo's native checkpoints ----------------------------------------------------
X3D = "pytorchvideo.x3d_xs"


@pytest.fixture(scope="module")
def source() -> Any:
    """A reduced X3D-XS with non-trivial weights, and a clip to run it on."""
    torch.manual_seed(5)
    model = build_model(X3D, reduced=True)
    _randomize(model.net)
    clip = torch.rand((2, *model.spec.shape), generator=torch.Generator().manual_seed(4))
    return model, clip


@pytest.mark.parametrize("layout", ["hub", "pyslowfast", "plain"])
def test_native_checkpoint_loads_with_identical_logits(source: Any, layout: str,
                                                       tmp_path: Path) -> None:
    model, clip = source
    state = model.net.state_dict()
    content = {"hub": {"model_state": state},
               "pyslowfast": {"epoch": 196, "model_state": state, "cfg": "MODEL:\n  ARCH: x3d\n"},
               "plain": state}[layout]
    path = tmp_path / "X3D_XS.pyth"
    torch.save(content, path)
    loaded = build_model(X3D, reduced=True, checkpoint=path)
    with torch.no_grad():
        assert torch.equal(loaded(clip), model(clip))


def test_saved_checkpoint_is_the_hub_format(source: Any, tmp_path: Path) -> None:
    from pytorchvideo.models.x3d import create_x3d

    from leaps.plugins import get_host

    model, _ = source
    path = tmp_path / "saved.pyth"
    get_host().adapter("pytorchvideo.x3d")().save_checkpoint(model.net, path)
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint) == ["model_state"]
    # pytorchvideo's own loader reads it (strict): load it the way hub builders do.
    create_x3d(input_clip_length=4, input_crop_size=64).load_state_dict(checkpoint["model_state"])


def test_checkpoint_with_wrong_keys_names_them(source: Any, tmp_path: Path) -> None:
    model, _ = source
    state = dict(model.net.state_dict())
    del state["blocks.0.conv.conv_t.weight"]
    state["blocks.9.extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pyth"
    torch.save({"model_state": state}, path)
    with pytest.raises(LeapsError) as error:
        build_model(X3D, reduced=True, checkpoint=path)
    message = str(error.value)
    assert "missing: blocks.0.conv.conv_t.weight" in message
    assert "unexpected: blocks.9.extra.weight" in message


def test_fine_tuned_classifier_needs_and_takes_its_labels(tmp_path: Path) -> None:
    labels = tmp_path / "classes.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(7)), encoding="utf-8")
    torch.manual_seed(6)
    tuned = build_model(X3D, reduced=True, labels=labels)
    _randomize(tuned.net)
    path = tmp_path / "tuned.pyth"
    torch.save({"model_state": tuned.net.state_dict()}, path)

    with pytest.raises(LeapsError, match="--labels"):
        build_model(X3D, reduced=True, checkpoint=path)

    loaded = build_model(X3D, reduced=True, checkpoint=path, labels=labels)
    clip = torch.rand((1, *loaded.spec.shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = loaded(clip)
        assert logits.shape == (1, 7)
        assert torch.equal(logits, tuned(clip))
    assert loaded.labels == tuple(f"class {i}" for i in range(7))


def test_unknown_arch_argument_is_a_clear_error() -> None:
    from leaps.plugins import get_host

    spec = load_registry().get(X3D)
    adapter = get_host().adapter("pytorchvideo.x3d")()
    with pytest.raises(LeapsError, match="'input_crop_sise'.*did you mean 'input_crop_size'"):
        adapter.create({"input_crop_sise": 64}, 400, spec.input_spec())
    with pytest.raises(LeapsError, match="'model_num_class'.*sets itself"):
        adapter.create({"model_num_class": 10}, 400, spec.input_spec())
