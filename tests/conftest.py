import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=600, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the tests marked slow (also: SPARSE_BIAS_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long randomised runs, skipped unless --slow or SPARSE_BIAS_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow", default=False) or os.environ.get("SPARSE_BIAS_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: pass --slow or set SPARSE_BIAS_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
