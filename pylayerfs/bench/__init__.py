"""``pylayerfs bench``: pylayerfs, the kernel's overlayfs and fuse-overlayfs side by side, on this machine."""
