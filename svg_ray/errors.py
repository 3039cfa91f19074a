"""One base class for every error a user can fix; the CLI prints it as one line.

Input that does not exist or does not parse, settings that contradict each other, a checkpoint of
the wrong kind, storage that refuses the request: each raises a subclass of ``SvgRayError`` whose
message names what was wrong and how to fix it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SvgRayError(Exception):
    """A problem the user can fix; ``svg-ray`` prints ``svg-ray <command>: error: <message>``."""
