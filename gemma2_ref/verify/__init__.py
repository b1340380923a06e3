"""Verification: golden cases and suites (golden.py, suites.py), comparing them (compare.py, measured.py), the
known mistakes (mistakes.py) and naming them (diagnose.py), name maps (names.py), check-config, figures,
and `assert_matches_golden` (testing.py). Imports the model and storage layers only.
"""
