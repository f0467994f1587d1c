"""Test-wide settings: one torch thread per pytest-xdist worker (2 workers share 2 cores), a
headless matplotlib backend, and hypothesis profiles."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")
