"""Byte units, defined once for the whole project (sizes are logged in MiB/GiB)."""

KiB = 2**10
MiB = 2**20
GiB = 2**30
