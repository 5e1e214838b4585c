import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def registry_url(tmp_path):
    """A real (embedded) schema registry over HTTP, as the platform runs it."""
    from streams.registry import SchemaRegistryServer

    server = SchemaRegistryServer(tmp_path / "registry" / "schemas.json")
    url = server.start()
    yield url
    server.stop()
