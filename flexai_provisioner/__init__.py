"""Run Jupyter kernels on FlexAI cloud GPUs, reached over SSH."""

from __future__ import annotations

__version__ = "0.1.0"
