"""The control plane: a JSON-over-UNIX-socket API on the daemon and the ``vfiodctl`` CLI.

* ``api``: the ``ControlTarget`` protocol the daemon implements, ``ControlError`` and the
  names of things (EEH ops and states, PE references).
* ``describe``: builds the API's JSON objects from ``vfiod.spapr`` objects.
* ``wire``: the sans-I/O protocol (newline-delimited JSON, strict validation).
* ``server``: ``serve_control()``, the trio server (peer credentials checked).
* ``cli``: ``vfiodctl``.

See docs/vfiodctl.md for the commands and the JSON schema.
"""

from .api import SCHEMA_VERSION, ControlError, ControlTarget

__all__ = ["SCHEMA_VERSION", "ControlError", "ControlTarget"]
