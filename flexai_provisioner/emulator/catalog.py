"""The GPU types the emulated platform offers, with their price and capacity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUCatalogEntry:
    """One GPU type: ``capacity`` is how many GPUs of it the whole platform has."""

    name: str
    memory_gb: int
    price_per_hour: float
    capacity: int


DEFAULT_GPU_TYPES: tuple[GPUCatalogEntry, ...] = (
    GPUCatalogEntry("A100", memory_gb=80, price_per_hour=1.89, capacity=8),
    GPUCatalogEntry("H100", memory_gb=80, price_per_hour=3.49, capacity=4),
    GPUCatalogEntry("L40S", memory_gb=48, price_per_hour=1.19, capacity=8),
    GPUCatalogEntry("L4", memory_gb=24, price_per_hour=0.59, capacity=16),
)
