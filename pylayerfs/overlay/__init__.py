"""The overlay engine."""
