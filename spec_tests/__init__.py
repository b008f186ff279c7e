"""The PAGI conformance suite (see APP.md and COVERAGE.md); a package only so that
its conftest never shadows tests/conftest.py when both folders run together."""
