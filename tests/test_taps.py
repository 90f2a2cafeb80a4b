"""The hooks behind the LEAPS terms: norm-layer statistics through the fused BatchNorm path give
the values and gradients of the generic path (channel_stats on the input), and leave the model
as it was."""

from __future__ import annotations

import torch
from torch import nn

from leaps import losses
from leaps.adapter import NormLayer
from leaps.taps import NormStatsRecorder


class _OwnForwardBN(nn.BatchNorm3d):
    """A BatchNorm subclass with a forward of its own (as some libraries ship)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def _net() -> tuple[nn.Module, list[NormLayer]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 5, 3, padding=1), _OwnForwardBN(5), nn.ReLU(),
                        nn.Conv3d(5, 6, 1), nn.BatchNorm3d(6, affine=False))
    for module in net:
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
    net.eval().requires_grad_(False)
    layers = [NormLayer(f"{i}", net[i], 1, net[i].running_mean, net[i].running_var)
              for i in (1, 4, 7)]
    return net, layers


def _reference_stats(net: nn.Module, layers: list[NormLayer], x: torch.Tensor):
    """Statistics read by plain pre-hooks and channel_stats (the generic path)."""
    stats = [None] * len(layers)

    def hook(i):
        def record(_module, inputs):
            stats[i] = losses.channel_stats(inputs[0], 1)
        return record

    handles = [layer.module.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        return net(x), stats
    finally:
        for handle in handles:
            handle.remove()


def _objective(out, stats, layers):
    targets = [(layer.running_mean, layer.running_var) for layer in layers]
    weights = losses.feature_stats_weights(len(layers), 10.0)
    return out.square().mean() + losses.feature_stats_loss(stats, targets, weights)


def test_fused_batch_norm_statistics_equal_the_hooked_ones_in_value_and_gradient():
    net, layers = _net()
    x = torch.rand(2, 3, 4, 6, 6)
    results = []
    for fused in (True, False):
        inp = x.clone().requires_grad_(True)
        if fused:
            with NormStatsRecorder(layers) as recorder:
                out = net(inp)
                # the plain BatchNorms are read through the fused function, the subclass not
                assert recorder.fused == [True, False, True]
                stats = recorder.collected()
        else:
            out, stats = _reference_stats(net, layers, inp)
        loss = _objective(out, stats, layers)
        results.append((out.detach(), [t.detach() for pair in stats for t in pair], loss.detach(),
                        torch.autograd.grad(loss, inp)[0]))
    (out, stats, loss, grad), (ref_out, ref_stats, ref_loss, ref_grad) = results
    assert torch.equal(out, ref_out)
    for a, b in zip(stats, ref_stats):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert not any(layer.module._forward_hooks for layer in layers)  # removed on close


def test_recorders_compose_and_a_training_layer_is_read_as_it_is():
    """Two open recorders each read the statistics; one left open (its statistics read once,
    never reset) changes nothing for a later recorder; a layer in training mode keeps its own
    output (batch statistics, running statistics updated) and is read as it is."""
    net, layers = _net()
    x = torch.rand(2, 3, 4, 6, 6)

    def run(recorder):
        inp = x.clone().requires_grad_(True)
        loss = _objective(net(inp), recorder.collected(), layers)
        return loss.detach(), torch.autograd.grad(loss, inp)[0]

    with NormStatsRecorder(layers) as alone:
        expected = run(alone)
    with NormStatsRecorder(layers) as first, NormStatsRecorder(layers) as second:
        net(x)
        for a, b in zip(first.collected(), second.collected()):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    left_open = NormStatsRecorder(layers)
    net(x)
    with NormStatsRecorder(layers) as later:
        assert all(torch.equal(a, b) for a, b in zip(run(later), expected))
    left_open.close()
    net[1].train()
    before = net[1].running_mean.clone()
    with NormStatsRecorder(layers) as recorder:
        out = net(x)
        mean, var = recorder.collected()[0]
    _, reference = _reference_stats(net.eval(), layers, x)
    assert not torch.equal(net[1].running_mean, before)
    assert torch.isfinite(out).all()
    assert torch.allclose(mean, reference[0][0], atol=1e-6)


def test_fused_statistics_under_bfloat16_autocast():
    """As on CUDA (bf16 autocast, here CPU's): the norm layers get bfloat16 activations; the
    statistics stay float32 and the loss and input gradient match the float32 run closely."""
    net, layers = _net()
    x = torch.rand(2, 3, 4, 6, 6)
    results, seen = [], []
    net[1].register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].dtype))
    for enabled in (False, True):
        inp = x.clone().requires_grad_(True)
        with NormStatsRecorder(layers) as recorder:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                out = net(inp)
                stats = recorder.collected()
            loss = _objective(out.float(), stats, layers)
            grad = torch.autograd.grad(loss, inp)[0]
        assert all(t.dtype == torch.float32 for pair in stats for t in pair)
        results.append((loss.detach(), grad.float()))
    assert seen == [torch.float32, torch.bfloat16]
    (loss, grad), (loss_bf16, grad_bf16) = results
    assert torch.allclose(loss_bf16, loss, rtol=0.02)
    assert torch.corrcoef(torch.stack([grad.flatten(), grad_bf16.flatten()]))[0, 1] > 0.99


def test_fused_output_can_be_modified_in_place():
    """torchvision's ResNets follow BatchNorm with ReLU(inplace=True)."""
    net, layers = _net()
    net[2].inplace = True
    inp = torch.rand(2, 3, 4, 6, 6, requires_grad=True)
    with NormStatsRecorder(layers) as recorder:
        out = net(inp)
        loss = _objective(out, recorder.collected(), layers)
    reference_out, reference_stats = _reference_stats(net, layers, inp)
    assert torch.equal(out, reference_out)
    reference = _objective(reference_out, reference_stats, layers)
    assert torch.allclose(torch.autograd.grad(loss, inp)[0],
                          torch.autograd.grad(reference, inp)[0], rtol=1e-4, atol=1e-7)


def test_a_trainable_bias_keeps_the_generic_path_and_gets_its_gradient():
    """The fused function gives the layer's affine no gradient, so a layer with any trainable
    parameter (here the bias alone) is read through channel_stats instead."""
    net, layers = _net()
    net[1].bias.requires_grad_(True)
    with NormStatsRecorder(layers) as recorder:
        out = net(torch.rand(2, 3, 4, 6, 6))
        assert recorder.fused == [False, False, True]
        _objective(out, recorder.collected(), layers).backward()
    assert net[1].bias.grad is not None and net[1].bias.grad.abs().sum() > 0


class _Frames(nn.Module):
    """[B, C, T, H, W] <-> [B*T, C, H, W] (a 2D norm layer inside a video network)."""

    def __init__(self, frames: int = 0) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames:  # back to a clip
            return x.unflatten(0, (-1, self.frames)).transpose(1, 2)
        return x.transpose(1, 2).flatten(0, 1)


def test_layers_with_different_batch_rows_are_read_one_by_one():
    """A BatchNorm2d on frames sees B*T rows, the BatchNorm3d B: their sums are not laid side by
    side, and the statistics still equal the generic path's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), _Frames(),
                        nn.BatchNorm2d(4), _Frames(4))
    for module in (net[1], net[3]):
        module.running_var.uniform_(0.5, 2)
    net.eval().requires_grad_(False)
    layers = [NormLayer(f"{i}", net[i], 1, net[i].running_mean, net[i].running_var)
              for i in (1, 3)]
    x = torch.rand(2, 3, 4, 6, 6)
    with NormStatsRecorder(layers) as recorder:
        inp = x.clone().requires_grad_(True)
        out = net(inp)
        assert recorder.fused == [True, True]
        loss = _objective(out, recorder.collected(), layers)
        grad = torch.autograd.grad(loss, inp)[0]
    inp = x.clone().requires_grad_(True)
    reference_out, reference_stats = _reference_stats(net, layers, inp)
    reference = _objective(reference_out, reference_stats, layers)
    assert torch.allclose(loss, reference, rtol=1e-6)
    assert torch.allclose(grad, torch.autograd.grad(reference, inp)[0], rtol=1e-4, atol=1e-7)
