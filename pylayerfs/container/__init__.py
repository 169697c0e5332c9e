"""Containers: an image's layers with a thin writable layer on top, and a process running in them."""
