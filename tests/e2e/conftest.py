import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole e2e session (starting one costs seconds)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
