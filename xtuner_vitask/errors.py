"""One exception type for every user-facing mistake (bad file, key, config).

The CLI prints it as a single ``error: ...`` line and exits 2; training tools
show it as the last line of the traceback. Messages name the thing and the fix.
Defined in ``ep/exemplar_errors.py`` so that EP exports, which carry a copy of
the EP code, raise it too.
"""
from .ep.exemplar_errors import VITaskError

__all__ = ["VITaskError"]
