"""The suite's warning policy (setup.cfg, [tool:pytest] filterwarnings): a deprecation fails its test."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["trainer_datasets.image_files", "torchvision.io.image"])
def test_a_deprecation_fails_the_test_whichever_module_it_names(category, module):
    # A warning names the module its stacklevel points at. torchvision.io's codecs warned with
    # stacklevel 1, naming torchvision.io.image rather than the module of ours that called them,
    # so the policy must not depend on the module a warning names.
    with pytest.raises(category):
        warnings.warn_explicit("deprecated", category, module.replace(".", "/") + ".py", 1, module=module)
