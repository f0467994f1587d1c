"""A missing optional extra is one GradflowError naming the extra to install."""

from __future__ import annotations

import importlib
import sys

import pytest

from gradflow.errors import GradflowError


@pytest.mark.parametrize("module,extra", [("lightning", "lightning"), ("tensorboard", "tensorboard")])
def test_missing_extra_names_it(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, f"gradflow.integrations.{module}", raising=False)
    with pytest.raises(GradflowError, match=rf"pip install gradflow\[{extra}\]") as err:
        importlib.import_module(f"gradflow.integrations.{module}")
    assert "\n" not in str(err.value)
