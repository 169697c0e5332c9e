"""pylayerfs: Docker image layers and the overlay2 storage driver, from first principles.

The filesystem semantics (:class:`pylayerfs.overlay.filesystem.Overlay`) are plain Python;
only :mod:`pylayerfs.fuse.adapter` imports the FUSE binding.
"""

__version__ = "0.1.0"
