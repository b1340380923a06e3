"""The test suite, a package so that its tests import the shared helpers as `tests.helpers.*` (pytest puts the
repository root on sys.path for a package of tests: no path edits in conftest.py)."""
