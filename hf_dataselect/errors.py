"""The one exception type for bad input.

Every check on user input (columns, budgets, files, options, model shapes) raises :class:`InputError` with a
message that names the problem and what would fix it, before any expensive work starts. The CLI turns it into
``error: <message>`` and exit status 2 instead of a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """The input (data, budget, option, file or model) cannot be used as given."""
