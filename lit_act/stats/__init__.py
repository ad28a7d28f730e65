"""Activation statistics: the module tap and fixed-shape torchmetrics accumulators behind lit-act's callbacks."""
