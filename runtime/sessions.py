"""Compatibility names for code not yet moved to :mod:`runtime.backends` (pipeline/run.py and some tests).

onnxruntime sessions now live in :mod:`runtime.backends.onnxruntime`; whether a backend runs
here is :meth:`runtime.backends.base.Backend.probe`. Remove this module once nothing imports it.
"""

from __future__ import annotations

from runtime.backends import provider_usable
from runtime.backends.base import tiny_model_bytes
from runtime.backends.onnxruntime import (CUDA_PROVIDERS, PROVIDER_ALIASES, SessionInfo, create_session,
                                          resolve_provider, session_options, short_name)


__all__ = ["CUDA_PROVIDERS", "PROVIDER_ALIASES", "SessionInfo", "create_session", "provider_usable",
           "resolve_provider", "session_options", "short_name", "tiny_model_bytes"]
