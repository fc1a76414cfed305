"""Exporters: each writes a compressed model in one format and has a loader counterpart."""
