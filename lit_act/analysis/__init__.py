"""Post-hoc analyses of trained weights (no hooks, no training-time state)."""
