"""Shared equipment of the protocol-level fakes (never imported by production code)."""
