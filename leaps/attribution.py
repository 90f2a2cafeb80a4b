"""Attribution: which parts of a video a classifier's decision rests on.

Every method is a small class with Captum's call shape::

    GradCAM(model).attribute(inputs, target=...)
    IntegratedGradients(model).attribute(inputs, target=..., n_steps=32)

``model`` is any module mapping pixels in [0, 1] ``[B, 3, T, H, W]`` to logits ``[B, K]`` (a
:class:`~leaps.adapter.VideoClassifier` for Grad-CAM on a named tap); ``target`` is a class
index, one index per clip, or None for each clip's predicted class. Methods return

* pixel methods (saliency, gradient x input, Integrated Gradients, SmoothGrad): a map of the
  input's shape ``[B, 3, T, H, W]``, as Captum does;
* region methods (Grad-CAM, spatiotemporal perturbation): ``[B, 1, T, H, W]``, already at the
  input's ``T, H, W``.

:func:`heatmap` turns either into ``[B, T, H, W]`` in [0, 1] for display and for the
faithfulness measures (:mod:`leaps.faithfulness`). Captum provides the gradient methods (an
optional extra: ``pip install 'leaps[captum]'``); leaps implements what Captum lacks: Grad-CAM
with per-time-step channel weights and spatiotemporal extremal perturbation.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leaps.adapter import Tap, VideoClassifier, as_video
from leaps.errors import LeapsError

Target = int | Sequence[int] | Tensor | None


# -------------------------------------------------------------------------------- helpers
def resolve_targets(model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
    """``target`` as a LongTensor ``[B]`` on the inputs' device; None -> predicted classes."""
    batch = inputs.shape[0]
    if target is None:
        with torch.no_grad():
            return model(inputs).argmax(dim=1)
    if isinstance(target, Tensor):
        indices = target.to(device=inputs.device, dtype=torch.long).reshape(-1)
    elif isinstance(target, int):
        indices = torch.full((batch,), target, dtype=torch.long, device=inputs.device)
    else:
        indices = torch.tensor(list(target), dtype=torch.long, device=inputs.device)
    if indices.numel() == 1 and batch > 1:
        indices = indices.expand(batch)
    if indices.numel() != batch:
        raise LeapsError(f"{indices.numel()} targets for a batch of {batch} clips; give one "
                         "target, or one per clip")
    classes = len(model.labels) if isinstance(model, VideoClassifier) else 0
    if classes and not bool(((indices >= 0) & (indices < classes)).all()):
        raise LeapsError(f"target indices {indices.tolist()} out of range: the model has "
                         f"{classes} classes (0..{classes - 1})")
    return indices


def _check_inputs(inputs: Tensor) -> Tensor:
    """The clips, detached and requiring grad (what every gradient method differentiates)."""
    if inputs.dim() != 5 or inputs.shape[1] != 3:
        raise LeapsError(f"attribution needs clips [B, 3, T, H, W], got shape "
                         f"{tuple(inputs.shape)}")
    return inputs.detach().requires_grad_(True)


def _captum_attr() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise LeapsError("this attribution method needs Captum: pip install 'leaps[captum]'"
                         ) from None
    return captum.attr


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def blur_frames(video: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of each frame of ``[B, C, T, H, W]`` (spatial only, ``sigma`` in pixels).

    Separable convolution with replicated borders, so any frame size works and the result keeps
    the input's value range. ``sigma <= 0`` returns the input.
    """
    if sigma <= 0:
        return video
    b, c, t, h, w = video.shape
    kernel = _gaussian_kernel(sigma, video.device, video.dtype)
    radius = (len(kernel) - 1) // 2
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    frames = F.conv2d(F.pad(frames, (radius, radius, 0, 0), mode="replicate"),
                      kernel.view(1, 1, 1, -1))
    frames = F.conv2d(F.pad(frames, (0, 0, radius, radius), mode="replicate"),
                      kernel.view(1, 1, -1, 1))
    return frames.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def baseline_video(inputs: Tensor, baseline: float | str | Tensor) -> Tensor:
    """A reference clip: a constant (0.0 = black), ``"blur"`` (each frame blurred with sigma
    a tenth of its short side) or ``"blur:S"`` (sigma S pixels), or a tensor broadcastable to
    ``inputs``."""
    if isinstance(baseline, Tensor):
        return baseline.to(inputs).expand_as(inputs)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, str) and (baseline == "blur" or baseline.startswith("blur:")):
        try:
            sigma = (float(baseline.split(":", 1)[1]) if ":" in baseline
                     else 0.1 * min(inputs.shape[-2:]))
        except ValueError:
            sigma = -1.0
        if sigma > 0:
            return blur_frames(inputs, sigma)
    raise LeapsError(f"unknown baseline {baseline!r}; use a number (0 = black), 'blur' or "
                     "'blur:SIGMA' (pixels)")


def _positive(name: str, value: Any, kind: type = int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or \
            (kind is int and int(value) != value):
        raise LeapsError(f"{name} must be a positive {kind.__name__}, got {value!r}")


# -------------------------------------------------------------------------------- methods
class Attribution:
    """Base of every method: holds the model; :meth:`attribute` is the one call."""

    name: ClassVar[str] = ""
    #: "pixel" maps have the input's shape; "region" maps are [B, 1, T, H, W].
    kind: ClassVar[str] = "pixel"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Tensor, target: Target = None, **params: Any) -> Tensor:
        raise NotImplementedError

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """The method's tunable parameters with their defaults (from :meth:`attribute`)."""
        signature = inspect.signature(cls.attribute)
        return {name: p.default for name, p in signature.parameters.items()
                if name not in ("self", "inputs", "target") and p.kind is p.KEYWORD_ONLY}

    @classmethod
    def check_parameters(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` merged over the defaults; an unknown name or a value of the wrong type
        (by the annotation of :meth:`attribute`; an int is a float) is a :class:`LeapsError`."""
        allowed = cls.parameters()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            listed = ", ".join(allowed) if allowed else "none"
            raise LeapsError(f"{cls.name} has no parameter {unknown[0]!r}; its parameters: "
                             f"{listed}")
        hints = typing.get_type_hints(cls.attribute)
        for key, value in params.items():
            kinds = typing.get_args(hints[key]) or (hints[key],)
            ok = any(isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                     for kind in kinds)
            ok = ok or (float in kinds and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                expected = " or ".join(k.__name__ for k in kinds)
                raise LeapsError(f"{cls.name} parameter {key} must be {expected}, got "
                                 f"{value!r}")
        return {**allowed, **params}


class Saliency(Attribution):
    """Vanilla gradient (Simonyan et al. 2014): ``d score_target / d input`` (Captum's
    ``Saliency``). ``abs`` takes its absolute value, as the paper does."""

    name = "saliency"

    def attribute(self, inputs: Tensor, target: Target = None, *, abs: bool = True) -> Tensor:
        inputs = _check_inputs(inputs)
        targets = resolve_targets(self.model, inputs, target)
        return _captum_attr().Saliency(self.model).attribute(inputs, target=targets,
                                                             abs=abs).detach()


class GradientXInput(Attribution):
    """Gradient times input (Shrikumar et al. 2016), Captum's ``InputXGradient``: the
    first-order Taylor contribution of each pixel relative to a black clip."""

    name = "gradient_x_input"

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        inputs = _check_inputs(inputs)
        targets = resolve_targets(self.model, inputs, target)
        return _captum_attr().InputXGradient(self.model).attribute(inputs,
                                                                   target=targets).detach()


class IntegratedGradients(Attribution):
    """Integrated Gradients (Sundararajan et al. 2017) with Captum:
    ``(x - x0) * integral_0^1 grad(x0 + a (x - x0)) da``, the integral over ``n_steps`` points
    (Gauss-Legendre, or ``method="riemann_trapezoid"`` etc.).

    ``baseline`` is the reference clip x0 (see :func:`baseline_video`: 0.0 = black, "blur");
    ``internal_batch_size`` bounds how many scaled clips go through the model at once (at
    least the batch size), so memory does not grow with ``n_steps``.
    """

    name = "integrated_gradients"

    def attribute(self, inputs: Tensor, target: Target = None, *, n_steps: int = 32,
                  baseline: float | str = 0.0, method: str = "gausslegendre",
                  internal_batch_size: int = 16) -> Tensor:
        inputs = _check_inputs(inputs)
        _positive("n_steps", n_steps)
        _positive("internal_batch_size", internal_batch_size)
        targets = resolve_targets(self.model, inputs, target)
        baselines = baseline_video(inputs.detach(), baseline)
        # Captum needs room for at least one scaled copy of every clip per pass
        chunk = max(int(internal_batch_size), inputs.shape[0])
        ig = _captum_attr().IntegratedGradients(self.model)
        try:
            return ig.attribute(inputs, baselines=baselines, target=targets, n_steps=int(n_steps),
                                method=method, internal_batch_size=chunk
                                ).detach()
        except AssertionError as exc:  # Captum rejects an unknown integration method this way
            raise LeapsError(f"integrated_gradients: {exc}; method is one of gausslegendre, "
                             "riemann_left, riemann_right, riemann_middle, riemann_trapezoid"
                             ) from None


class SmoothGrad(Attribution):
    """SmoothGrad (Smilkov et al. 2017) with Captum's ``NoiseTunnel`` over ``Saliency``: the
    gradient averaged over ``samples`` noisy copies of the clip (Gaussian noise of standard
    deviation ``noise``, in pixel units of the [0, 1] range), ``batch`` copies per pass."""

    name = "smoothgrad"

    def attribute(self, inputs: Tensor, target: Target = None, *, samples: int = 16,
                  noise: float = 0.15, abs: bool = True, batch: int = 8) -> Tensor:
        inputs = _check_inputs(inputs)
        _positive("samples", samples)
        _positive("noise", noise, float)
        _positive("batch", batch)
        targets = resolve_targets(self.model, inputs, target)
        attr = _captum_attr()
        tunnel = attr.NoiseTunnel(attr.Saliency(self.model))
        return tunnel.attribute(inputs, nt_type="smoothgrad", nt_samples=int(samples),
                                nt_samples_batch_size=int(batch), stdevs=float(noise),
                                target=targets, abs=abs).detach()


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise LeapsError(f"the Grad-CAM layer returns {type(output).__name__}, not a tensor; pick "
                     "another layer (`leaps layers` lists the taps)")


def _with_first_tensor(output: Any, tensor: Tensor) -> Any:
    """``output`` with its (first) tensor replaced: a module output of the same structure."""
    if isinstance(output, Tensor):
        return tensor
    items = list(output)
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            items[i] = tensor
            break
    return type(output)(items) if isinstance(output, tuple) else items


def resolve_layer(model: nn.Module, layer: str | None) -> Tap:
    """The Grad-CAM layer: a tap of a VideoClassifier by name (its reshaping to
    ``[B, C, T', H', W']`` included), the adapter's default when ``layer`` is None, or any
    submodule by name whose output already is ``[B, C, T', H', W']``."""
    if layer is None:
        if not isinstance(model, VideoClassifier):
            raise LeapsError("Grad-CAM needs a layer name for a model that is not a leaps "
                             "VideoClassifier; pass layer=...")
        layer = model.gradcam_layer
    if isinstance(model, VideoClassifier):
        for tap in model.taps:
            if tap.name == layer:
                return tap
        try:
            return Tap(layer, model.net.get_submodule(layer), as_video)
        except AttributeError:
            pass
        taps = [t.name for t in model.taps]
        close = difflib.get_close_matches(layer, taps, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise LeapsError(f"{model.model_name} has no layer {layer!r}; {hint}pass a tap name "
                         f"(`leaps layers --model {model.model_name}` lists them: "
                         f"{taps[0]} ... {taps[-1]})")
    try:
        return Tap(layer, model.get_submodule(layer), as_video)
    except AttributeError:
        raise LeapsError(f"the model has no submodule {layer!r}; pass the name of a layer "
                         "whose output is [B, C, T, H, W]") from None


def capture_gradients(model: nn.Module, taps: Sequence[Tap], inputs: Tensor, targets: Tensor
                      ) -> list[tuple[Tensor, Tensor]]:
    """One forward and backward pass: for each tap, its activation and the gradient of the
    summed target scores with respect to it, both read as video ``[B, C, T', H', W']`` through
    the tap's function (the gradient goes through the same reshaping: tap functions only
    rearrange and select). A tap whose output the score does not use gets a zero gradient."""
    captured: dict[int, tuple[Any, Tensor]] = {}

    def hook_for(index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if index in captured:  # a module run twice in one forward: keep the first call
                return None
            tensor = _first_tensor(output)
            captured[index] = (output, tensor)
            # Later layers get a copy, so an in-place op downstream cannot alter the tensor
            # whose gradient is taken.
            return _with_first_tensor(output, tensor.clone())
        return hook

    handles = [tap.module.register_forward_hook(hook_for(i)) for i, tap in enumerate(taps)]
    try:
        with torch.enable_grad():
            # The input needs grad so the layers are on a graph even for a frozen model.
            logits = model(inputs.detach().requires_grad_(True))
            missing = [tap.name for i, tap in enumerate(taps) if i not in captured]
            if missing:
                raise LeapsError(f"layer {missing[0]!r} did not run in the forward pass; pick "
                                 "another layer (`leaps layers` lists the taps)")
            score = logits.gather(1, targets[:, None]).sum()
            tensors = [captured[i][1] for i in range(len(taps))]
            grads = torch.autograd.grad(score, tensors, allow_unused=True) if taps else ()
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    with torch.no_grad():
        for i, (tap, grad) in enumerate(zip(taps, grads)):
            output, tensor = captured[i]
            grad = torch.zeros_like(tensor) if grad is None else grad
            activation = tap.to_video(output).detach()
            gradient = tap.to_video(_with_first_tensor(output, grad)).detach()
            if activation.dim() != 5:
                raise LeapsError(f"layer {tap.name!r} gives shape {tuple(activation.shape)}, "
                                 "not [B, C, T, H, W]; pick a tap (`leaps layers` lists them)")
            pairs.append((activation, gradient))
    return pairs


#: How a class activation map weighs the layer's activation ``A`` by its gradient ``G``.
CAM_WEIGHTS = ("gradcam", "gradcam++", "layercam")


def cam_from(activation: Tensor, gradient: Tensor, temporal: str = "frame",
             weights: str = "gradcam") -> Tensor:
    """The (signed, not yet rectified) class activation map ``[B, 1, T', H', W']`` from a
    layer's activation and gradient ``[B, C, T', H', W']``.

    ``weights``:

    * ``gradcam`` (Selvaraju et al. 2017): ``w_c = mean G_c`` over the pooled positions;
    * ``gradcam++`` (Chattopadhay et al. 2018, with its exponential-score closed form, as
      pytorch-grad-cam computes it): ``w_c = sum alpha_c * ReLU(G_c)``, ``alpha_c = G_c^2 /
      (2 G_c^2 + sum(A_c) G_c^3)`` (0 where ``G_c = 0``), sums over the pooled positions;
    * ``layercam`` (Jiang et al. 2021): a weight per position, ``ReLU(G) * A`` summed over
      channels (meant for early, high-resolution layers, where one weight per channel mixes
      the object with the background; ``temporal`` does not apply).

    The pooled positions are each time step's ``H' x W'`` (``temporal="frame"``) or the whole
    ``T' x H' x W'`` (``"clip"``).
    """
    dims = (3, 4) if temporal == "frame" else (2, 3, 4)
    if weights == "layercam":
        return (gradient.clamp(min=0) * activation).sum(dim=1, keepdim=True)
    if weights == "gradcam++":
        squared = gradient ** 2
        denominator = 2 * squared + activation.sum(dim=dims, keepdim=True) * gradient ** 3
        alpha = torch.where(gradient != 0, squared / torch.where(
            denominator != 0, denominator, torch.ones_like(denominator)),
            torch.zeros_like(gradient))
        channel = (alpha * gradient.clamp(min=0)).sum(dim=dims, keepdim=True)
    else:
        channel = gradient.mean(dim=dims, keepdim=True)
    return (channel * activation).sum(dim=1, keepdim=True)


class GradCAM(Attribution):
    """Grad-CAM (Selvaraju et al. 2017) for video, with per-time-step channel weights.

    With ``A`` the layer's activation as video ``[B, C, T', H', W']`` (a transformer tap is
    reshaped by the adapter's tap function, class tokens dropped) and ``G = d score / d A``:

        temporal="frame" (default): w[b,c,t] = mean_{h,w} G[b,c,t,h,w]
        temporal="clip":            w[b,c]   = mean_{t,h,w} G[b,c,t,h,w]  (Captum's LayerGradCam)
        cam[b,t,h,w] = ReLU(sum_c w * A[b,c,t,h,w])

    ``weights="gradcam++"`` or ``"layercam"`` computes those variants instead (see
    :func:`cam_from`); plain Grad-CAM is the default.

    Per-time-step weights (as VideoVisual and mmaction2 compute them) let each moment of the
    clip weigh the channels that matter then; one weight per clip blurs what moves. The map is
    upsampled trilinearly to the input's ``T, H, W``. ``layer`` names a tap (default: the
    adapter's ``gradcam_layer``; should its output not reach the score, as the last block of a
    class-token transformer does not, or its grid have no interior cell, as the last blocks of
    a deep network on a small input do, the last tap before it that reaches the score on a
    grid of at least 3x3; ``.tap`` tells which layer was used).
    """

    name = "gradcam"
    kind = "region"

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model)
        self.tap = resolve_layer(model, layer)
        self._default_layer = layer is None and isinstance(model, VideoClassifier)

    def activations_and_gradients(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's activation and ``d sum_b score_b / d activation`` as ``[B,C,T',H',W']``.

        Clips in a batch do not interact (eval mode), so the gradient of the summed scores is
        each clip's own gradient.
        """
        return capture_gradients(self.model, [self.tap], inputs, targets)[0]

    def _usable_layer(self, inputs: Tensor, targets: Tensor, activation: Tensor,
                      gradient: Tensor) -> tuple[Tensor, Tensor]:
        """Step back from a default layer that cannot localise anything.

        Two cases. Its gradient is exactly zero: its output does not reach the score, as for
        the last block of a class-token transformer (the head reads only the class token,
        which that block's patch tokens no longer feed). Or its grid has no interior cell
        (fewer than 3 cells a side, as at the end of a deep network on a small input): then
        every cell touches the frame's border, and the upsampled map peaks on a plateau at the
        border or is flat, wherever the evidence lies. With the adapter's default layer the
        last earlier tap that reaches the score on a grid with an interior is used (found in
        one extra pass, and kept for later calls); failing that, the last one that reaches the
        score. A layer the user named is used as it is, except that a zero gradient is an
        error.
        """
        def reaches(grad: Tensor) -> bool:
            return bool(grad.any())

        def interior(act: Tensor) -> bool:
            return act.shape[3] >= 3 and act.shape[4] >= 3

        if reaches(gradient) and (interior(activation) or not self._default_layer):
            return activation, gradient
        taps = list(getattr(self.model, "taps", []))
        names = [t.name for t in taps]
        index = names.index(self.tap.name) if self.tap.name in names else 0
        earlier = taps[:index]
        if not self._default_layer:
            hint = f"pick an earlier tap, e.g. {earlier[-1].name!r}" if earlier else \
                "pick another layer"
            raise LeapsError(f"layer {self.tap.name!r} does not reach the class score (its "
                             f"gradient is zero, as for the last block of a class-token "
                             f"transformer); {hint}")
        found = list(zip(earlier, capture_gradients(self.model, earlier, inputs, targets)))
        found.append((self.tap, (activation, gradient)))
        reaching = [(tap, pair) for tap, pair in found if reaches(pair[1])]
        if not reaching:
            raise LeapsError("no tap of the model reaches the class score (all gradients are "
                             "zero); check that the model's output depends on its input")
        good = [(tap, pair) for tap, pair in reaching if interior(pair[0])]
        self.tap, pair = (good or reaching)[-1]
        return pair

    def attribute(self, inputs: Tensor, target: Target = None, *, temporal: str = "frame",
                  relu: bool = True, weights: str = "gradcam") -> Tensor:
        inputs = _check_inputs(inputs)
        if temporal not in ("frame", "clip"):
            raise LeapsError(f"temporal must be 'frame' (weights per time step) or 'clip' "
                             f"(one weight per channel), got {temporal!r}")
        if weights not in CAM_WEIGHTS:
            raise LeapsError(f"weights must be one of {', '.join(CAM_WEIGHTS)}, got "
                             f"{weights!r}")
        targets = resolve_targets(self.model, inputs, target)
        activation, gradient = self.activations_and_gradients(inputs, targets)
        activation, gradient = self._usable_layer(inputs, targets, activation, gradient)
        cam = cam_from(activation, gradient, temporal, weights)
        if relu:
            cam = cam.clamp(min=0)
        return F.interpolate(cam, size=tuple(inputs.shape[2:]), mode="trilinear",
                             align_corners=False)


class SpatiotemporalPerturbation(Attribution):
    """Spatiotemporal extremal perturbation (Fong et al. 2019; Li et al. 2021, VideoVisual).

    Finds a smooth mask ``m`` in [0, 1] over the whole clip that keeps a fixed fraction
    ``area`` of its voxels and, where it keeps them, preserves the target score:

        x_m  = m * x + (1 - m) * p(x)      p = per-frame Gaussian blur (or black: "fade")
        loss = -log softmax(f(x_m))_y                                   (variant "preserve")
               + lambda_t * mean((sort(m) - r)^2)                       (area, whole volume)
               + smoothness * mean((m[t+1] - m[t])^2)                   (temporal smoothness)

    ``r`` is the sorted reference of ``(1 - area) * N`` zeros then ``area * N`` ones over all
    ``N = T*H*W`` voxels, so frames compete for the area (a frame may get none). ``lambda_t``
    grows geometrically from ``area_weight`` to ``area_weight * area_growth`` over the run, so
    the score shapes the mask first and the area is enforced by the end. Variant "delete"
    minimises ``-log(1 - p_y)`` of the clip with the mask blurred away; "dual" adds both.

    Parameters: ``area`` kept fraction; ``iterations`` Adam steps at learning rate ``lr`` on a
    mask grid of one cell per ``step`` pixels (default: about 16 cells on the short side),
    upsampled bilinearly and smoothed with a Gaussian of ``sigma`` pixels (default ``step/2``)
    per frame; ``blur_sigma`` the perturbation's blur in pixels (default a tenth of the short
    side). Returns the mask ``[B, 1, T, H, W]``.
    """

    name = "perturbation"
    kind = "region"

    def attribute(self, inputs: Tensor, target: Target = None, *, area: float = 0.1,
                  iterations: int = 300, lr: float = 0.05, variant: str = "preserve",
                  perturbation: str = "blur", step: int = 0, sigma: float = 0.0,
                  blur_sigma: float = 0.0, smoothness: float = 1.0, area_weight: float = 10.0,
                  area_growth: float = 16.0, seed: int = 0) -> Tensor:
        inputs = _check_inputs(inputs)
        if not 0 < area < 1:
            raise LeapsError(f"area must lie in (0, 1) (the fraction of the clip kept), got "
                             f"{area!r}")
        _positive("iterations", iterations)
        _positive("lr", lr, float)
        if variant not in ("preserve", "delete", "dual"):
            raise LeapsError(f"variant must be preserve, delete or dual, got {variant!r}")
        if perturbation not in ("blur", "fade"):
            raise LeapsError(f"perturbation must be blur or fade, got {perturbation!r}")
        for key, value in (("smoothness", smoothness), ("area_weight", area_weight),
                           ("step", step), ("sigma", sigma), ("blur_sigma", blur_sigma)):
            if not isinstance(value, (int, float)) or value < 0:
                raise LeapsError(f"{key} must be a number >= 0, got {value!r}")
        if area_growth < 1:
            raise LeapsError(f"area_growth must be >= 1, got {area_growth!r}")
        targets = resolve_targets(self.model, inputs, target)
        x = inputs.detach()
        b, _, t, h, w = x.shape
        step = int(step) or max(1, round(min(h, w) / 16))
        sigma = float(sigma) or step / 2
        blur = float(blur_sigma) or 0.1 * min(h, w)
        with torch.no_grad():
            perturbed = blur_frames(x, blur) if perturbation == "blur" else torch.zeros_like(x)
        grid = (t, math.ceil(h / step), math.ceil(w / step))
        generator = torch.Generator().manual_seed(seed)
        # Start near 0.5 with a little noise, so the mask is free to go either way.
        start = 0.5 + 0.01 * torch.randn(b, 1, *grid, generator=generator)
        param = start.to(x.device, x.dtype).requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=lr)
        volume = t * h * w
        reference = torch.zeros(volume, device=x.device, dtype=x.dtype)
        reference[volume - max(1, round(area * volume)):] = 1.0
        growth = area_growth ** (1 / max(1, iterations - 1))
        weight = area_weight
        for _ in range(int(iterations)):
            mask = self.smooth_mask(param, (h, w), sigma)
            loss = self._reward(x, perturbed, mask, targets, variant)
            ordered = mask.reshape(b, -1).sort(dim=1).values
            loss = loss + weight * ((ordered - reference) ** 2).mean(dim=1)
            if t > 1 and smoothness > 0:
                loss = loss + smoothness * ((mask[:, :, 1:] - mask[:, :, :-1]) ** 2
                                            ).mean(dim=(1, 2, 3, 4))
            (grad,) = torch.autograd.grad(loss.sum(), param)
            optimizer.zero_grad(set_to_none=True)
            param.grad = grad
            optimizer.step()
            with torch.no_grad():
                param.clamp_(0.0, 1.0)
            weight *= growth
        with torch.no_grad():
            return self.smooth_mask(param, (h, w), sigma)

    @staticmethod
    def smooth_mask(param: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
        """Low-resolution mask ``[B,1,T,h,w]`` -> smooth full-size mask ``[B,1,T,H,W]`` in
        [0, 1]: bilinear upsampling per frame, then a Gaussian of ``sigma`` pixels."""
        b, _, t, gh, gw = param.shape
        frames = param.permute(0, 2, 1, 3, 4).reshape(b * t, 1, gh, gw)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        mask = frames.reshape(b, t, 1, *size).permute(0, 2, 1, 3, 4)
        return blur_frames(mask, sigma)

    def _reward(self, x: Tensor, perturbed: Tensor, mask: Tensor, targets: Tensor,
                variant: str) -> Tensor:
        clips = []
        if variant in ("preserve", "dual"):
            clips.append(mask * x + (1 - mask) * perturbed)
        if variant in ("delete", "dual"):
            clips.append((1 - mask) * x + mask * perturbed)
        logp = F.log_softmax(self.model(torch.cat(clips)), dim=1)
        logp = logp.gather(1, targets.repeat(len(clips))[:, None])[:, 0]
        parts = logp.split(x.shape[0])
        loss = torch.zeros_like(parts[0])
        index = 0
        if variant in ("preserve", "dual"):
            loss = loss - parts[index]
            index += 1
        if variant in ("delete", "dual"):
            # -log(1 - p), computed from log p without cancellation
            loss = loss - torch.log(-torch.expm1(parts[index].clamp(max=-1e-6)))
        return loss


METHODS: dict[str, type[Attribution]] = {
    cls.name: cls for cls in (Saliency, GradientXInput, IntegratedGradients, SmoothGrad,
                              GradCAM, SpatiotemporalPerturbation)
}
ALIASES = {"gradients": "saliency", "gradient": "saliency", "ig": "integrated_gradients",
           "gxi": "gradient_x_input", "input_x_gradient": "gradient_x_input",
           "grad_cam": "gradcam", "extremal": "perturbation",
           "spatiotemporal_perturbation": "perturbation"}


def get_method(name: str) -> type[Attribution]:
    """The method class for a name (``gradcam``, ``integrated-gradients``, ``ig`` ...)."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(key, [*METHODS, *ALIASES], n=2, cutoff=0.5)
    suggestions = dict.fromkeys(ALIASES.get(c, c) for c in close)
    hint = f"did you mean {', '.join(repr(c) for c in suggestions)}? " if close else ""
    raise LeapsError(f"unknown attribution method {name!r}; {hint}methods: "
                     f"{', '.join(METHODS)}")


def heatmap(attributions: Tensor, percentile: float = 99.0) -> Tensor:
    """Any method's map -> ``[B, T, H, W]`` in [0, 1] (per clip).

    Pixel maps ``[B, 3, T, H, W]`` become the sum of absolute values over colour channels
    (a pixel matters whichever way it pushes); region maps ``[B, 1, T, H, W]`` keep their
    positive part. Each clip is divided by its ``percentile``-th value (not the maximum, so
    a few extreme gradient pixels do not black out the rest) and clipped to 1.
    """
    if attributions.dim() != 5:
        raise ValueError(f"expected a map [B, C, T, H, W], got {tuple(attributions.shape)}")
    attributions = attributions.detach().float()
    if attributions.shape[1] == 1:
        values = attributions[:, 0].clamp(min=0)
    else:
        values = attributions.abs().sum(dim=1)
    flat = values.reshape(values.shape[0], -1)
    scale = torch.quantile(flat, percentile / 100, dim=1) if percentile < 100 else \
        flat.max(dim=1).values
    scale = torch.where(scale > 0, scale, flat.max(dim=1).values)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values / scale.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
