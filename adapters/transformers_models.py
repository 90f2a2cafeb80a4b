"""Built-in plugin ``transformers``: Hugging Face ``*ForVideoClassification`` models.

Adapters ``transformers.videomae``, ``transformers.timesformer`` and ``transformers.vivit``
(``pip install 'leaps[transformers]'``). Each builds its model from a transformers config made
of the registry entry's ``arch`` (any argument of the family's config class: ``hidden_size``,
``num_hidden_layers``, ``patch_size`` ...), overridden by the ``config.json`` a checkpoint folder
carries, so a fine-tune of another size needs no entry of its own. ``image_size`` and
``num_frames`` always come from the entry's input.

Checkpoints: a ``save_pretrained`` folder (``model.safetensors`` or ``pytorch_model.bin``
inside, next to ``config.json``), one of those files on its own, or a plain state dict.
On-disk key names are mapped onto the modules with transformers' own conversion table (in
transformers 5 VideoMAE stores ``q_bias``/``v_bias``, ViViT ``encoder.layer``), so what
``from_pretrained`` loads, leaps loads. Nothing is ever downloaded.

Taps: every encoder layer, its tokens laid onto the patch grid ``[B, C, T', H', W']`` in the
family's token order (time-major for VideoMAE/ViViT, space-major for TimeSformer), class
tokens dropped. The models are BN-free: R_feat matches LayerNorm input statistics estimated
from the stimuli. Grad-CAM's default layer is the last encoder layer, or for the class-token
families (TimeSformer, ViViT) the one before it, since the head reads only the class token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, Tap, tokens_to_video
from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl

# Keys of a config.json that are not architecture: labels come from the entry or --labels,
# the input size from the entry, the rest is bookkeeping of the saver.
_NOT_ARCH = {"architectures", "id2label", "label2id", "num_labels", "problem_type",
             "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type",
             "return_dict", "output_hidden_states", "output_attentions", "use_cache",
             "finetuning_task", "_attn_implementation", "_attn_implementation_autoset"}


class HFVideoAdapter(Adapter):
    """One ``transformers`` video classifier family. Subclasses name the config and model
    classes, the token order, the number of class tokens and how the patch grid is derived."""

    requires: ClassVar[dict[str, str]] = {"transformers": "leaps[transformers]"}
    checkpoint_format = ("a Hugging Face save_pretrained folder (model.safetensors or "
                         "pytorch_model.bin, with config.json), one of those files, or a plain "
                         "state dict")
    checkpoint_files: ClassVar[tuple[str, ...]] = ("model.safetensors", "pytorch_model.bin")

    model_type: ClassVar[str] = ""
    config_class: ClassVar[str] = ""
    model_class: ClassVar[str] = ""
    token_order: ClassVar[str] = "thw"
    class_tokens: ClassVar[int] = 0

    # -- the family's layout ----------------------------------------------------------
    def tubelet(self, config: Any) -> tuple[int, int, int]:
        """Frames x pixels x pixels of one token."""
        return (1, config.patch_size, config.patch_size)

    def grid(self, config: Any, spec: InputSpec) -> tuple[int, int, int]:
        t, h, w = self.tubelet(config)
        return (spec.frames // t, spec.size // h, spec.size // w)

    # -- the contract -----------------------------------------------------------------
    def config(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> Any:
        import transformers

        config_cls = getattr(transformers, self.config_class)
        for key, given in (("image_size", spec.size), ("num_frames", spec.frames)):
            if key in arch and arch[key] != given:
                raise LeapsError(f"the checkpoint's config.json has {key} {arch[key]}, but the "
                                 f"model is built for an input of {spec.frames} frames of "
                                 f"{spec.size}x{spec.size} (its registry entry, or its reduced "
                                 "test size); build it at the input the checkpoint was saved "
                                 "for (an entry with that input, --reduced or not)")
        kwargs = {k: v for k, v in arch.items() if k not in ("image_size", "num_frames")}
        labels = spec.labels or tuple(str(i) for i in range(num_classes))
        try:
            config = config_cls(**kwargs, image_size=spec.size, num_frames=spec.frames,
                                num_labels=num_classes,
                                id2label=dict(enumerate(labels)),
                                label2id={name: i for i, name in enumerate(labels)})
        except (TypeError, ValueError) as exc:
            raise LeapsError(f"{self.config_class} rejects the arch arguments {sorted(kwargs)}: "
                             f"{exc}; fix the entry's arch") from None
        t, h, w = self.tubelet(config)
        if spec.frames % t or spec.size % h or spec.size % w:
            raise LeapsError(f"{spec.frames} frames of {spec.size}x{spec.size} do not divide into "
                             f"{t}x{h}x{w} tubelets; fix the entry's input or arch")
        return config

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        import transformers

        config = self.config(arch, num_classes, spec)
        return getattr(transformers, self.model_class)(config)

    def layers(self, net: nn.Module) -> tuple[str, nn.ModuleList]:
        """The encoder's layer list: the module list holding ``num_hidden_layers`` layers."""
        count = net.config.num_hidden_layers
        for name, module in net.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return name, module
        raise LeapsError(f"{type(net).__name__} has no list of {count} encoder layers; "
                         f"{self.name} does not fit this transformers version")

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        grid = self.grid(net.config, spec)
        prefix, order = self.class_tokens, self.token_order

        def to_video(output: Any) -> Tensor:
            if isinstance(output, (tuple, list)):
                output = output[0]
            return tokens_to_video(output, grid, prefix=prefix, order=order)

        name, layers = self.layers(net)
        return [Tap(f"{name}.{i}", layer, to_video) for i, layer in enumerate(layers)]

    def gradcam_layer(self, net: nn.Module, taps: list[Tap]) -> str:
        """The last encoder layer; for class-token families the one before it: the head reads
        only the class token, which the last layer's patch tokens no longer feed (their
        gradient is zero)."""
        if self.class_tokens and len(taps) > 1:
            return taps[-2].name
        return taps[-1].name

    def forward(self, net: nn.Module, x: Tensor) -> Tensor:
        # transformers' video models take pixel_values [B, T, C, H, W]
        return net(pixel_values=x.transpose(1, 2)).logits

    # -- checkpoints ------------------------------------------------------------------
    def arch_from_checkpoint(self, arch: dict[str, Any], path: Path) -> dict[str, Any]:
        """The entry's arch updated by the ``config.json`` beside the weights, if any."""
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            return arch
        try:
            saved = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LeapsError(f"cannot read {config_file} ({exc}); fix or remove it") from None
        if not isinstance(saved, dict):
            raise LeapsError(f"{config_file} is not a transformers config (no JSON object)")
        found = saved.get("model_type")
        if found and found != self.model_type:
            raise LeapsError(f"checkpoint {path.parent} holds a {found!r} model (its "
                             f"config.json), not {self.model_type!r}; pick an entry of adapter "
                             f"transformers.{found} or another checkpoint")
        return {**arch, **{k: v for k, v in saved.items() if k not in _NOT_ARCH}}

    def state_dict_from_checkpoint(self, obj: Any, net: nn.Module | None = None
                                   ) -> dict[str, Tensor]:
        """The checkpoint's keys renamed as ``from_pretrained`` renames them: transformers'
        conversion table for the model (on-disk names of this library version and legacy
        ones), and the base-model prefix added or dropped."""
        state = super().state_dict_from_checkpoint(obj)
        if net is None or not isinstance(state, dict):
            return state
        return _renamed_like_from_pretrained(state, net)

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        """A plain state dict (safetensors for ``.safetensors``), module names as they are."""
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            import torch

            torch.save(state, path)

    def save_native(self, net: nn.Module, directory: Path) -> Path:
        """transformers' own ``save_pretrained`` folder (its on-disk key names included)."""
        folder = Path(directory) / "save_pretrained"
        net.save_pretrained(str(folder))
        return folder


def _renamed_like_from_pretrained(state: dict[str, Tensor], net: nn.Module
                                  ) -> dict[str, Tensor]:
    own = net.state_dict()
    prefix = getattr(net, "base_model_prefix", "")
    renamings: list[Any] = []
    try:  # transformers >= 5: the per-model conversion table from_pretrained applies
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: module names are the on-disk names
        pass
    else:
        transforms = get_model_conversion_mapping(net)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if converters:
            raise LeapsError(f"{type(net).__name__} checkpoints need tensor conversions that "
                             "leaps does not apply; convert the checkpoint with "
                             "save_pretrained of this transformers version first")
    renamed = {}
    for key, tensor in state.items():
        new = key
        for renaming in renamings:
            new, _ = renaming.rename_source_key(new)
        if new not in own and prefix:
            if new.startswith(prefix + ".") and new[len(prefix) + 1:] in own:
                new = new[len(prefix) + 1:]
            elif f"{prefix}.{new}" in own:
                new = f"{prefix}.{new}"
        renamed[new] = tensor
    return renamed


class VideoMAEAdapter(HFVideoAdapter):
    """VideoMAE: tubelets of ``tubelet_size`` frames, no class token, time-major tokens."""

    name = "transformers.videomae"
    model_type = "videomae"
    config_class = "VideoMAEConfig"
    model_class = "VideoMAEForVideoClassification"

    def tubelet(self, config: Any) -> tuple[int, int, int]:
        return (config.tubelet_size, config.patch_size, config.patch_size)


class TimesformerAdapter(HFVideoAdapter):
    """TimeSformer: one token per frame and patch after a class token, *space-major* (all
    frames of the first patch, then the next patch)."""

    name = "transformers.timesformer"
    model_type = "timesformer"
    config_class = "TimesformerConfig"
    model_class = "TimesformerForVideoClassification"
    token_order = "hwt"
    class_tokens = 1


class VivitAdapter(HFVideoAdapter):
    """ViViT (factorised-encoder-free 'model 1'): tubelets ``tubelet_size`` = [t, h, w], a
    class token, time-major tokens."""

    name = "transformers.vivit"
    model_type = "vivit"
    config_class = "VivitConfig"
    model_class = "VivitForVideoClassification"
    class_tokens = 1

    def tubelet(self, config: Any) -> tuple[int, int, int]:
        t, h, w = config.tubelet_size
        return (int(t), int(h), int(w))


ADAPTERS = (VideoMAEAdapter, TimesformerAdapter, VivitAdapter)


@hookimpl
def leaps_register_adapters(register: Any) -> None:
    for adapter in ADAPTERS:
        register(adapter)
