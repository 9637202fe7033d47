"""Distributex: a network mutex and semaphore service for coordinating cluster operations."""

__version__ = "1.0.0.dev0"
