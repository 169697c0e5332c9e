"""The image side."""
