"""Each LEAPS term against hand-computed values, and gradchecks in double precision."""

import math

import pytest
import torch

from leaps import losses


def test_jvs_identical_orthogonal_and_hand_value():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert losses.jvs(a, a).item() == pytest.approx(1.0)
    assert losses.jvs(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == 0.0
    # a.b = 2, |a|^2 = 2, |b|^2 = 4 -> 2 / (2 + 4 - 2) = 0.5
    value = losses.jvs(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
    assert value.item() == pytest.approx(0.5)


def test_priming_weights_are_linear_from_first_to_last():
    w = losses.priming_weights(5, 1.0, 0.2)
    assert torch.allclose(w, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2]))
    assert losses.priming_weights(1, 0.75, 0.1).tolist() == [0.75]


def test_priming_loss_zero_for_identical_embeddings_and_hand_value():
    z = [torch.rand(2, 4), torch.rand(2, 8)]
    weights = losses.priming_weights(2, 1.0, 0.5)
    assert losses.priming_loss(z, z, weights).item() == pytest.approx(0.0, abs=1e-6)
    # orthogonal at tap 1 (JVS 0), identical at tap 2: (1/L) * (1.0 * 1 + 0.5 * 0) = 0.5
    x = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    v = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    assert losses.priming_loss(x, v, weights).item() == pytest.approx(0.5)


def test_priming_loss_broadcasts_one_stimulus_embedding_over_the_batch():
    x = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    v = [torch.tensor([[1.0, 0.0]])]
    # sample 1 identical (0), sample 2 orthogonal (1): mean 0.5
    assert losses.priming_loss(x, v, torch.tensor([1.0])).item() == pytest.approx(0.5)


def test_embedding_mean_and_frame_vectors():
    f = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float).reshape(2, 3, 4, 2, 2)
    assert torch.allclose(losses.embedding_mean(f), f.mean(dim=(2, 3, 4)))
    assert losses.frame_vectors(f).shape == (2, 3, 4)


def test_coherence_static_features_pull_zero_push_margin():
    static = torch.ones(1, 3, 5)
    # consecutive term 0; every non-consecutive pair at distance 0 -> hinge = margin
    assert losses.coherence_loss(static, 0.0).item() == 0.0
    assert losses.coherence_loss(static, 0.3).item() == pytest.approx(0.3)


def test_coherence_hand_value():
    # one channel, T = 3: f = [0, 1, 3]; consecutive |0-1|=1, |1-3|=2 -> mean 1.5;
    # the one non-consecutive pair (0, 2): distance 3 -> hinge max(0, 2 - 3) = 0; with delta 5 -> 2
    f = torch.tensor([[[0.0, 1.0, 3.0]]])
    assert losses.coherence_loss(f, 2.0).item() == pytest.approx(1.5)
    assert losses.coherence_loss(f, 5.0).item() == pytest.approx(3.5)
    assert losses.coherence_loss(torch.rand(2, 4, 1), 1.0).item() == 0.0
    assert losses.coherence_margin(f).item() == pytest.approx(3.0)


def test_feature_stats_zero_when_batch_stats_equal_running_stats():
    x = torch.randn(4, 3, 2, 5, 5)
    mean, var = losses.channel_stats(x, 1)
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3, 4)), atol=1e-6)
    assert torch.allclose(var, x.var(dim=(0, 2, 3, 4), unbiased=False), atol=1e-5)
    w = losses.feature_stats_weights(1, 10.0)
    assert losses.feature_stats_loss([(mean, var)], [(mean, var)], w).item() == 0.0


def test_feature_stats_hand_value_and_first_layer_weight():
    stats = [(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0])),
             (torch.tensor([0.0]), torch.tensor([2.0]))]
    targets = [(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0])),
               (torch.tensor([0.0]), torch.tensor([1.0]))]
    w = losses.feature_stats_weights(2, 10.0)
    assert w.tolist() == [10.0, 1.0]
    # layer 1: ||(3,-4)|| = 5, var 0 -> 10 * 5; layer 2: mean 0, ||1|| = 1 -> 1
    assert losses.feature_stats_loss(stats, targets, w).item() == pytest.approx(51.0)


def test_channel_stats_on_token_layout():
    tokens = torch.randn(2, 7, 5)  # LayerNorm input [B, N, C]
    mean, var = losses.channel_stats(tokens, -1)
    assert mean.shape == (5,)
    assert torch.allclose(mean, tokens.reshape(-1, 5).mean(0), atol=1e-6)


def test_cross_entropy_is_on_logits():
    logits = torch.tensor([[2.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert losses.cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(expected)


def test_gradcheck_terms_in_double_precision():
    torch.manual_seed(0)
    a = torch.rand(2, 4, dtype=torch.double, requires_grad=True)
    b = torch.rand(1, 4, dtype=torch.double)
    w = torch.tensor([0.7], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: losses.priming_loss([x], [b], w), (a,))
    f = torch.rand(2, 3, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: losses.coherence_loss(x, 0.9), (f,))
    x = torch.randn(3, 2, 2, 3, 3, dtype=torch.double, requires_grad=True)
    target = (torch.zeros(2, dtype=torch.double), torch.ones(2, dtype=torch.double))

    def feat(inp):
        mean, var = losses.channel_stats(inp, 1)
        return losses.feature_stats_loss([(mean, var)], [target],
                                         torch.tensor([2.0], dtype=torch.double))

    assert torch.autograd.gradcheck(feat, (x,))
    tokens = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: losses.priming_loss([losses.embedding_mean(t[..., None, None])], [b[:, :3]], w),
        (tokens,))


# -- the batched terms against their per-layer definitions ------------------------------------
def _priming_per_tap(embeddings, stimulus, weights):
    terms = [w * (1 - losses.jvs(z, v)) for z, v, w in zip(embeddings, stimulus, weights)]
    return torch.stack(terms).mean(dim=0).mean()


def _feature_per_layer(stats, targets, weights):
    terms = [w * (torch.linalg.vector_norm(m - tm) + torch.linalg.vector_norm(v - tv))
             for (m, v), (tm, tv), w in zip(stats, targets, weights)]
    return torch.stack(terms).sum()


def _values_and_grads(fn, inputs, *rest):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = fn(inputs, *rest)
    return value.detach(), torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("stimulus_batch", [1, 3])
def test_priming_loss_equals_the_per_tap_sum(stimulus_batch):
    torch.manual_seed(0)
    sizes = [24, 24, 48, 96, 192, 7]
    z = [torch.rand(3, c) for c in sizes]
    v = [torch.rand(stimulus_batch, c) for c in sizes]
    w = losses.priming_weights(len(sizes), 1.0, 0.1)
    fast, fast_grads = _values_and_grads(losses.priming_loss, z, v, w)
    slow, slow_grads = _values_and_grads(_priming_per_tap, z, v, w)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=0)
    for g, h in zip(fast_grads, slow_grads):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-9)


def test_feature_stats_loss_equals_the_per_layer_sum_and_handles_exact_matches():
    torch.manual_seed(0)
    sizes = [3, 64, 64, 128, 256, 512, 16]
    stats = [(torch.randn(c), torch.rand(c)) for c in sizes]
    targets = [(torch.randn(c), torch.rand(c)) for c in sizes]
    targets[2] = (stats[2][0].clone(), stats[2][1].clone())  # a layer already matched: norm 0
    w = losses.feature_stats_weights(len(sizes), 10.0)
    flat = [t for pair in stats for t in pair]

    def pairs(ts):
        return [(ts[i], ts[i + 1]) for i in range(0, len(ts), 2)]

    fast, fast_grads = _values_and_grads(
        lambda ts, tg, ww: losses.feature_stats_loss(pairs(ts), tg, ww), flat, targets, w)
    slow, slow_grads = _values_and_grads(
        lambda ts, tg, ww: _feature_per_layer(pairs(ts), tg, ww), flat, targets, w)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=0)
    for g, h in zip(fast_grads, slow_grads):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
def test_channel_stats_match_var_mean_in_value_and_gradient(layout):
    """Both backward paths: channels on axis 1 (batch-norm kernel) and last (addcmul)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 9, 9) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]
    channel_dim = -1 if layout == "tokens" else 1
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    g_mean, g_var = torch.randn(16), torch.randn(16)

    def ours(inp):
        mean, var = losses.channel_stats(inp[0], channel_dim)
        return torch.stack([mean, var]), (mean * g_mean).sum() + (var * g_var).sum()

    def reference(inp):
        var, mean = torch.var_mean(inp[0], dim=dims, unbiased=False)
        return torch.stack([mean, var]), (mean * g_mean).sum() + (var * g_var).sum()

    results = []
    for fn in (ours, reference):
        inp = [x.detach().clone().requires_grad_(True)]
        values, scalar = fn(inp)
        results.append((values.detach(), torch.autograd.grad(scalar, inp)[0]))
    (v1, g1), (v2, g2) = results
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_means_give_the_autograd_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 5)
    h = torch.randn(2, 5, 3)
    ours = torch.autograd.grad((losses.embedding_mean(x * 2) * g).sum()
                               + (losses.frame_vectors(x * 2) * h).sum(), x)[0]
    reference = torch.autograd.grad(((x * 2).mean(dim=(2, 3, 4)) * g).sum()
                                    + ((x * 2).mean(dim=(3, 4)) * h).sum(), x)[0]
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-8)


def test_channel_stats_one_pass_variance_is_accurate_on_offset_activations():
    """The CPU one-pass path (sums of x and x^2) against a float64 reference, on activations
    whose mean is 8 standard deviations from zero (E[x^2] - mean^2 cancels 64:1)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 20, 20) * 0.5 + 4.0
    mean, var = losses.channel_stats(x, 1)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6)
    assert torch.allclose(var.double(), ref_var, rtol=1e-4)
    assert (losses.channel_stats(torch.full((2, 3, 2, 4, 4), 5.0), 1)[1] == 0).all()


# -- the fused BatchNorm + statistics path -----------------------------------------------------
def _bn(channels: int = 6) -> torch.nn.BatchNorm3d:
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm3d(channels)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return bn.eval().requires_grad_(False)


def _fused_stats(x: torch.Tensor, bn: torch.nn.BatchNorm3d):
    """One layer through the fused path: (output, mean, var) of its input."""
    y, sums, squares = losses.batch_norm_sums(
        x, bn(x), losses.batch_norm_scale(bn.weight, bn.running_var, bn.eps, x))
    return (y, *losses.moments_from_sums(sums, squares, x.numel() // x.shape[1]))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_sums_equal_the_layer_and_channel_stats(affine):
    """Output, statistics and the gradient of any mix of the three equal the layer's own
    forward plus channel_stats through autograd (the path for every other norm layer)."""
    bn = _bn()
    if not affine:
        bn.weight, bn.bias = None, None
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5, 5) * 2 + 0.5
    g_y, g_mean, g_var = torch.randn(2, 6, 3, 5, 5), torch.randn(6), torch.randn(6)

    def fused(inp):
        return _fused_stats(inp, bn)

    def reference(inp):
        return (bn(inp), *losses.channel_stats(inp, 1))

    for use in [(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 0, 1)]:
        results = []
        for fn in (fused, reference):
            inp = x.clone().requires_grad_(True)
            y, mean, var = fn(inp)
            scalar = sum(w * (t * g).sum() for w, t, g in
                         zip(use, (y, mean, var), (g_y, g_mean, g_var)) if w)
            results.append(((y.detach(), mean.detach(), var.detach()),
                            torch.autograd.grad(scalar, inp)[0]))
        (values, grad), (ref_values, ref_grad) = results
        for v, r in zip(values, ref_values):
            assert torch.allclose(v, r, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6), use


def test_gradcheck_batch_norm_sums_in_double_precision():
    bn = _bn(3).double()
    x = torch.randn(2, 3, 2, 3, 3, dtype=torch.double, requires_grad=True)
    target = (torch.zeros(3, dtype=torch.double), torch.ones(3, dtype=torch.double))

    def fn(inp):
        y, mean, var = _fused_stats(inp, bn)
        return y.sin().sum() + losses.feature_stats_loss(
            [(mean, var)], [target], torch.tensor([2.0], dtype=torch.double))

    assert torch.autograd.gradcheck(fn, (x,))


def test_batch_norm_sums_keep_half_precision_activations():
    """Under autocast (CUDA) activations are bfloat16: the output and the input's gradient keep
    that dtype, the statistics are reduced in float32."""
    bn = _bn()
    x = (torch.randn(2, 6, 2, 4, 4) + 1).bfloat16().requires_grad_(True)
    y, mean, var = _fused_stats(x, bn)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    ref_var, ref_mean = torch.var_mean(x.detach().double(), dim=(0, 2, 3, 4), unbiased=False)
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-4)
    assert torch.allclose(var.double(), ref_var, rtol=1e-3)
    (y.float().sum() + var.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
