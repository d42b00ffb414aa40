"""Run Jupyter kernels on FlexAI cloud GPUs, reached over SSH."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The server extension; imported only here, so kernels alone never load jupyter_server."""
    from .serverext import FlexAIExtension

    return [{"module": "flexai_provisioner.serverext", "app": FlexAIExtension}]
