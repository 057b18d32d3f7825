"""Factories and harnesses shared by the tests (and by policy owners' own tests)."""
