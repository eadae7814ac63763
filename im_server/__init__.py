"""The IM server that imcloud installs on every app node."""

__version__ = "0.1.0"
