"""Pallas GPU kernels and their plain-jnp references; array-level code only (no lorax imports)."""
