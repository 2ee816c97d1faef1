"""Run external programs on Butler datasets (issue 4/5)."""
