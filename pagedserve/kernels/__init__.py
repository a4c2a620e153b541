"""Paged-attention kernels; `reference` is the pure-torch path and the oracle."""
