"""Benchmarks (not part of the test suite); run them as scripts from the repository root."""
