import pytest

from tiny import save_tiny_llama, tiny_tokenizer


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama model folder, read-only, shared by every test that loads a model by path."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
