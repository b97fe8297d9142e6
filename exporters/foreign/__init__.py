"""Foreign ONNX detectors: wrapping a file of another layout into a contract file (``wrap``),
its describe format (``describe``, presets in ``describe_examples/``) and the numpy decoding the
wrapped file is validated against (``decode``).

Named ``foreign`` rather than ``onnx`` so that it never reads as the ``onnx`` package."""
