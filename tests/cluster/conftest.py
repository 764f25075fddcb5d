from pathlib import Path

import pytest

from .ray_fixtures import user_checkout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The user's copy of the code that a module's jobs upload (launch/submit.sh)."""
    return user_checkout(tmp_path_factory.mktemp("checkout"))
