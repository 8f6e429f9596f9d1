import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the test module, unless the session already holds one (the e2e tests')."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
