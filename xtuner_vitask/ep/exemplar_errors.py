"""The one exception type of xtuner-vitask (``xtuner_vitask.errors`` re-exports it).

It lives here, beside the EP code, because the EP files are copied verbatim into every EP export:
an exported model then refuses bad input with the same type and wording as training does.
"""


class VITaskError(Exception):
    """A user-facing error whose message names the thing that is wrong and the fix."""
