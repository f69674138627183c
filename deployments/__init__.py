"""Ebb's Ray floor: Serve deployments, the coordinator, the config and the HTTP protocol."""
