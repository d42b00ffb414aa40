"""Jupyter server extension: the ``/api/compute`` REST API, progress events, cost limits.

Enabled on install by ``etc/jupyter/jupyter_server_config.d/flexai_provisioner.json``;
see ``docs/server.md`` for the endpoints and the event schema.
"""

from __future__ import annotations

from .app import SCHEMA_ID, FlexAIExtension

__all__ = ["SCHEMA_ID", "FlexAIExtension"]
