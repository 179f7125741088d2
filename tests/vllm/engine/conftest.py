import pytest


@pytest.fixture(scope="session")
def model_dir():
    """The embedded SmolLM2 as a safetensors directory, the form vLLM loads (exported once)."""
    from cattn.vllm.model_dir import export_embedded_model

    return str(export_embedded_model())
