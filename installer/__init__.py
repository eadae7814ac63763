"""imcloud: one command to a self-hosted private IM cloud."""

__version__ = "0.1.0"
