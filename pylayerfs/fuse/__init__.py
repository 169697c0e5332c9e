"""The FUSE side."""
