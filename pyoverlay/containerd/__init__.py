"""Read-only inspection of a containerd root: listing, mounting and verifying snapshots."""
