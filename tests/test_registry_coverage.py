"""Every registered model must be exercised by at least one parametrised test.

Registries are data, so adding an entry to models.toml without a test of its family
would otherwise go unnoticed; this test fails and names the uncovered models.
"""

import pytest


def test_every_registered_model_has_a_parametrised_test(request, registry):
    if not getattr(request.config, "detbench_whole_suite", False):
        pytest.skip("only meaningful when the whole suite is collected (run `python -m pytest` without selection)")
    covered = request.config.detbench_covered_models
    missing = [name for name in registry.names if name not in covered]
    assert not missing, f"registered models with no parametrised test: {missing}"
