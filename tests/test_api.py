"""Every public name in ``lorasoup`` resolves (lazy imports cannot point at a missing module)."""

import importlib

import pytest

import lorasoup


@pytest.mark.parametrize("name", lorasoup.__all__)
def test_public_name_resolves(name):
    value = getattr(lorasoup, name)
    module = importlib.import_module(lorasoup._API[name])
    assert value is getattr(module, name)
