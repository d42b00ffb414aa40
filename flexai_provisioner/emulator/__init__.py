"""A local FlexAI platform: the REST API of docs/api.md, with instances that are real sshd
processes on 127.0.0.1, fault injection, and nothing imported from the provisioner (it
stands in for someone else's cloud).

    with Emulator(api_keys=["secret"]) as emulator:
        requests.get(emulator.url + "/v1/gpu-types", headers={"Authorization": "Bearer secret"})
"""

from __future__ import annotations

from .app import Emulator
from .catalog import DEFAULT_GPU_TYPES, GPUCatalogEntry
from .errors import EmulatorError
from .faults import Faults

__all__ = ["DEFAULT_GPU_TYPES", "Emulator", "EmulatorError", "Faults", "GPUCatalogEntry"]
