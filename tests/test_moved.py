"""The 0.1 module paths and public names keep working for one release, deprecated.

``tests/golden/public_names_0_1.json`` lists every public name of every module of freesegdiff
0.1 (written from that tree before the layered move: each module's ``__all__``, else the names
it defines). Each must still resolve at its old path: from the module it moved to (with a
DeprecationWarning naming it), under its new name, or as a deprecated no-op whose job the
settings now do.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest

from freesegdiff import _moved

OLD = json.loads((Path(__file__).parent / "golden" / "public_names_0_1.json").read_text())
# Removed on purpose: dead code (issue 20 asked for it gone), never used by anything.
GONE = {("freesegdiff.tiny.vocab", "write_json")}


@pytest.mark.parametrize("module", sorted(OLD))
def test_every_0_1_name_resolves_at_its_old_path(module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(module)
        missing = [
            name for name in OLD[module] if (module, name) not in GONE and not hasattr(old, name)
        ]
    assert missing == [], f"{module} lost {missing}"
    if module in _moved.MOVED:
        new = _moved.MOVED[module][0]
        assert any(
            issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught
        ), f"importing {module} should warn that it moved to {new}"


def test_a_renamed_or_retired_name_says_so():
    with pytest.warns(DeprecationWarning, match="is pooled_prompt_embeddings now"):
        from freesegdiff.attention_maps import class_embeddings
    from freesegdiff.stages.features.attention_maps import pooled_prompt_embeddings

    assert class_embeddings is pooled_prompt_embeddings
    from freesegdiff.features import check_feature_config

    with pytest.warns(DeprecationWarning, match="check themselves when they are made"):
        check_feature_config(object())
    with pytest.warns(DeprecationWarning, match="ScoringProtocol"):
        from freesegdiff.evaluation.metrics import Protocol
    from freesegdiff.evaluation.metrics import ScoringProtocol

    assert Protocol is ScoringProtocol


def test_importing_an_old_path_warns_with_the_new_one(monkeypatch):
    import sys

    for name in ("freesegdiff.commands", "freesegdiff.commands.segment"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(DeprecationWarning, match="commands.segment moved to freesegdiff.cli"):
        from freesegdiff.commands.segment import run
    from freesegdiff.cli.segment import run as new_run

    assert run is new_run
