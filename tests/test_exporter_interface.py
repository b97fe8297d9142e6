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


def test_no_exporter_function_takes_more_than_8_parameters():
    """Settings travel as one object (a dataclass such as exporters.matching.MatchRules), not as
    ever-longer parameter lists."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "exporters").rglob("*.py")) + [root / "quantization" / "quantize.py"]
    over = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                if count > 8:
                    over.append(f"{file.relative_to(root)}:{node.lineno} {node.name} ({count})")
    assert not over, "functions over 8 parameters:\n" + "\n".join(over)
