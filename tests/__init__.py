"""The test suite; ``REPO`` is the checkout it runs from."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
