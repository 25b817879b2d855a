"""aelab."""
