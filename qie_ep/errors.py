"""Errors qie reports to its users.

A ``UserError`` is a mistake the user can fix (a missing file, a model that is not ONNX, data that does
not fit the model, an output path that cannot be written): the command line prints its message on one
line and exits with status 2, without a traceback; library callers catch it like any exception.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix; shown as one line, no traceback."""
