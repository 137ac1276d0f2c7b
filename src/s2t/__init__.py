"""select-to-think."""
