import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def registry_url(tmp_path):
    """A real (embedded) schema registry over HTTP, as the platform runs it."""
    from schemas.registry_server import SchemaRegistryServer

    server = SchemaRegistryServer(tmp_path / "registry" / "schemas.json")
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="module")
def catalogue():
    """The built-in models, one catalogue per test module (each part loaded once per module)."""
    from gpu_agents.models import ModelCatalogue

    return ModelCatalogue()


@pytest.fixture(scope="module")
def embeds(request, catalogue):
    """(prompt, negative prompt) embeddings of the test module's MODEL, PROMPT and NEGATIVE, as the prompt stage
    encodes them."""
    from gpu_agents.encoding import encode_prompts

    module = request.module
    text = catalogue.text_encoder(module.MODEL)
    return encode_prompts(text, [module.PROMPT]), encode_prompts(text, [module.NEGATIVE])
