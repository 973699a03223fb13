"""The project's one error base class.

Every error the package raises for bad input (a file, a series, a config value, a command-line argument) is an
:class:`LDCTError`, so an entry point catches one class and prints its message; anything else is a bug and keeps
its traceback. ``LDCTError`` is a ``ValueError``, as each of its subclasses was before it existed, so callers that
catch ``ValueError`` still work. This module imports nothing from the package (every room may import it).
"""

from __future__ import annotations


class LDCTError(ValueError):
    """Bad input that the user can fix; ``str(e)`` names the file, key or argument and what to do."""
