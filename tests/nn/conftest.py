import warnings

import pytest

from tests.helpers import assert_all_close


@pytest.fixture
def assert_close():
    """``assert_all_close`` for one tensor or a list of tensors, with a default tolerance of 1e-5."""

    def check(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
        if not isinstance(actual, (list, tuple)):
            actual, expected = [actual], [expected]
        names = [name if len(actual) == 1 else f"{name}[{i}]" for i in range(len(actual))]
        assert_all_close(names, list(actual), list(expected), atol=atol, rtol=rtol)

    return check


@pytest.fixture(scope="session")
def sru_package():
    """The authors' package, imported once (its first import compiles a C++ extension, ~35 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("sru")
