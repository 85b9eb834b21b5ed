"""Lets `python scripts/X.py` find the project's packages when it was not pip-installed (a plain checkout)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
