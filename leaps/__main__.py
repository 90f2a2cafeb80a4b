"""``python -m leaps``: the ``leaps`` command (also under ``torchrun -m leaps``)."""

from leaps.cli import main

main()
