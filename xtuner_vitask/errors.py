"""One exception type for every user-facing mistake (bad file, key, config).

The CLI prints it as a single ``error: ...`` line and exits 2; training tools
show it as the last line of the traceback. Messages name the thing and the fix.
"""


class VITaskError(Exception):
    """A user-facing error whose message names the thing that is wrong and the fix."""
