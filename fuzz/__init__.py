"""Coverage-guided fuzzing (atheris / libFuzzer) of every place guest or user bytes enter.

``python -m fuzz.run`` (what ``make fuzz`` runs) fuzzes each target in its own
process; ``fuzz/targets/`` holds one module per entry point. See docs/security.md.
"""
