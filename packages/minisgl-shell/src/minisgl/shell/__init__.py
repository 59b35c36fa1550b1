"""minisgl's interactive chat shell (prompt_toolkit). The REPL itself arrives with issue 5."""

__version__ = "0.1.0"
