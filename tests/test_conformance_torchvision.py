"""Every torchvision registry entry passes the conformance suite at its reduced size."""

from leaps.registry import load_registry
from leaps.testing import AdapterConformance


class TestTorchvisionConformance(AdapterConformance):
    models = [name for name, spec in load_registry().models.items()
              if spec.adapter.startswith("torchvision.")]
