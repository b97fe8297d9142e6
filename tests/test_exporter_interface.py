"""Each source framework declares its capabilities (exporters.interface.Framework); the declaration
must say what its export function takes, since the dispatcher passes a capability keyword only to
a framework that declares it and never reads signatures itself."""

import importlib
import inspect

import pytest

from core.errors import ConfigError
from exporters import FRAMEWORKS, export_model
from exporters.registry import load_registry


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_declared_capabilities_are_the_export_keywords(name):
    framework = FRAMEWORKS[name]
    if name == "pytorch":
        pytest.importorskip("torch")
    module = importlib.import_module(framework.export)
    params = inspect.signature(module.export).parameters
    assert {"weights", "input_size", "progress"} <= set(params)
    assert ("batch" in params) == framework.supports_batch
    assert ("accept_mismatch" in params) == framework.supports_accept_mismatch
    assert framework.name == name and framework.native.startswith(f"exporters.{name}.")


def test_every_registry_framework_has_an_exporter():
    assert {spec.framework for spec in load_registry()} <= set(FRAMEWORKS)


def test_accept_mismatch_is_refused_where_not_declared(tmp_path):
    spec = next(s for s in load_registry() if s.framework == "darknet")
    with pytest.raises(ConfigError, match="has no accepted failure mode"):
        export_model(spec, tmp_path / "m.onnx", accept_mismatch=True)
    assert not any(tmp_path.iterdir())


def test_the_dispatcher_reads_no_signature():
    import exporters

    assert "import inspect" not in inspect.getsource(exporters)
