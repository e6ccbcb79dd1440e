"""Repository tools (not installed with the package): README and docs generators.

Run from the repository root, e.g. ``python -m tools.readme`` or ``python -m tools.comet_readme``.
"""
