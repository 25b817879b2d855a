"""LightningModules wrapping the plain models in aelab.models."""
