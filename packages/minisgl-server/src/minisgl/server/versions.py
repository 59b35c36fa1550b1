"""The installed versions of minisgl's packages, as their metadata (pyproject.toml) gives them."""

from __future__ import annotations

import importlib.metadata

PACKAGES = ("minisgl-kernels", "minisgl-core", "minisgl-server", "minisgl-shell")
# What a source checkout that was never installed (its src folders on PYTHONPATH) reports.
NOT_INSTALLED = "0+source"


def server_version() -> str:
    try:
        return importlib.metadata.version("minisgl-server")
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions() -> dict[str, str]:
    """Each installed minisgl package's version (the shell is optional and may be absent)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
