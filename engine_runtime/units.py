"""Byte units, defined once for the whole project (sizes are logged in MiB/GiB)."""

__all__ = ["GiB", "KiB", "MiB"]


KiB = 2**10
MiB = 2**20
GiB = 2**30
