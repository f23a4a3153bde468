"""Embedded run configurations for `tli pipeline run --preset NAME` (YAML, validated by tests)."""
