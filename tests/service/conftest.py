import hashlib

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.utils.checkpoints import make_settings, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_checkpoint_id(tiny_checkpoint):
    return hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint))) as c:
        yield c
