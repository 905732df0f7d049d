"""Shared test settings: float64 references, and Hypothesis profiles sized for 2 CPU cores."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the machine's cores, one torch thread each.
    import torch

    torch.set_num_threads(1)
