"""VITask (task-specific visual instruction tuning) as an XTuner plugin.

Importing the top package is cheap (no torch); it is imported at interpreter
start on CPU installs (see ``_compat``), so keep it that way.
"""
__version__ = "0.1.0"
