"""The native FUSE transport: pylayerfs speaks the kernel protocol on /dev/fuse itself (no libfuse)."""
