"""Single source of the project version (read by hatchling and reported on the wire)."""

__version__ = "0.1.0"
