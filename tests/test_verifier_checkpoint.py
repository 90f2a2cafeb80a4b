"""The verifier's own weights (--verifier-checkpoint) and the warning when a verifier runs with
untrained BatchNorm statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leaps.adapter import sha256_file
from leaps.config import InvertConfig
from leaps.errors import LeapsError
from leaps.invert import invert
from leaps.registry import build_model
from leaps.testing import Conv3DStack, InProcessPlugin, motion_entry, registered_plugin

BLOCKS = [[8, [1, 2, 2]], [16, [2, 2, 2]]]
PLUGIN = InProcessPlugin([Conv3DStack], {
    "vc.model": motion_entry(["left", "right"], BLOCKS, verifier="vc.verifier"),
    "vc.verifier": motion_entry(["left", "right"], BLOCKS, verifier="none"),
})
# Without stimuli (priming off), x* in pixels: the spectrum parameterisation needs stimuli.
CONFIG = dict(iterations=1, priming_weight=0.0, samples=1, param="pixels")


def _run(out: Path, **kwargs: object) -> tuple[list[str], dict]:
    warnings: list[str] = []
    invert("vc.model", targets=["left"], config=InvertConfig(**CONFIG), out=out,
           progress=False, on_warning=warnings.append, **kwargs)
    return warnings, json.loads((out / "run.json").read_text())


def test_untrained_verifier_warns_and_its_checkpoint_is_used(tmp_path: Path) -> None:
    with registered_plugin(PLUGIN, "vc"):
        warnings, record = _run(tmp_path / "random")
        assert any("verifier vc.verifier runs with untrained BatchNorm statistics" in w
                   and "--verifier-checkpoint" in w for w in warnings), warnings
        assert record["verifier_checkpoint"] is None
        # weights with trained statistics: no warning, and the run records the file
        verifier = build_model("vc.verifier")
        with torch.no_grad():
            for layer in verifier.norm_layers:
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
        path = tmp_path / "verifier.pth"
        torch.save(verifier.net.state_dict(), path)
        warnings, record = _run(tmp_path / "trained", verifier_checkpoint=path)
        assert not any("untrained" in w for w in warnings), warnings
        assert record["verifier_checkpoint"] == str(path)
        assert record["verifier_checkpoint_sha256"] == sha256_file(path)
        with pytest.raises(LeapsError, match=r"--verifier-checkpoint needs a verifier model, "
                                             r"not 'self'"):
            _run(tmp_path / "self", verifier="self", verifier_checkpoint=path)
        assert not (tmp_path / "self").exists()
