"""Sluice: real-time search and recommendation serving."""

__version__ = "0.1.0"
