from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" (the default, and what .ci/run sets) is derandomized: the examples are a function of the
# test alone, so a failure in CI reproduces on any machine with the same command. "dev" draws new
# examples on every run, to look further (HYPOTHESIS_PROFILE=dev pytest ...).
settings.register_profile(
    "ci", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=10, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield
