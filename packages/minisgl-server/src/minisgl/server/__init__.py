"""minisgl's server layer: the `minisgl` command line, and (with issue 5) the OpenAI-compatible server."""

__version__ = "0.1.0"
