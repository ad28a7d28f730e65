"""lit-act callbacks: add them to any ``Trainer(callbacks=[...])``."""
