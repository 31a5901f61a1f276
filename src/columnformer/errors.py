"""The library's configuration error (a low layer: the preset table and the config schema both raise it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""
