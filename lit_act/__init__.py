"""lit-act."""
