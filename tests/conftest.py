import pytest

from tiny import tiny_tokenizer


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
