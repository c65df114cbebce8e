"""Scripts that print measured speed and size figures (not tests: timings on shared machines are noisy)."""
