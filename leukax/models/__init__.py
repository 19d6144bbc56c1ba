"""Flax backbones and heads. See `leukax.models.registry` for names, input sizes and normalisation."""
