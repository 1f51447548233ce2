"""Benchmarks and fault scenarios; a package so tests import them (`from benchmarks import fault_tolerance`)."""
