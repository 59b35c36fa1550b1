from __future__ import annotations

from minisgl.core.fused_ops import silu_and_mul

__all__ = ["silu_and_mul"]
