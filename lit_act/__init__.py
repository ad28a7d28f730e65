"""lit-act: PyTorch Lightning plug-ins for activation and sparsity research."""

__version__ = "0.1.0"
