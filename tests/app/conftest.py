"""Fixtures of the command-line tests."""
import pytest

from cli_helpers import make_image_folder


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """A command run without --output writes runs/...; keep that out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny ImageFolder (train/ and val/, 4 classes), made once per test module."""
    return make_image_folder(tmp_path_factory.mktemp("data"))
