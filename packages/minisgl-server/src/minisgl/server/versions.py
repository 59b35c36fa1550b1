"""The installed versions of minisgl's packages, as their metadata (pyproject.toml) gives them."""

from __future__ import annotations

import importlib.metadata

PACKAGES = ("minisgl-kernels", "minisgl-core", "minisgl-server", "minisgl-shell")


def server_version() -> str:
    return importlib.metadata.version("minisgl-server")


def package_versions() -> dict[str, str]:
    """Each installed minisgl package's version (the shell is optional and may be absent)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
