"""Optional extras: the one error raised when a feature's package is not installed.

A low layer with no imports of its own, so the data loaders and the trackers can both raise it; the CLI turns it into one line naming the extra to install (exit 1: the input is fine, the
environment is not).
"""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """An optional feature was asked for but its package is not installed (the message names the extra)."""


def require(module: str, feature: str, extra: str, package: str | None = None):
    """Import and return ``module``, or raise :class:`MissingExtraError` saying ``feature`` needs ``extra``.

    ``package``: the distribution that is missing when it is not the module's top-level name (e.g.
    ``torch.utils.tensorboard`` needs ``tensorboard``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the {package or module.split('.')[0]} package, which is not installed ({exc}); "
            f"install the extra: pip install 'columnformer[{extra}]'"
        ) from None
