"""leukax: JAX/Flax deep ensembles for acute-leukemia detection in blood-smear images."""

__version__ = "0.1.0"
