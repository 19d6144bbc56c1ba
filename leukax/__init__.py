"""leukax: JAX/Flax deep ensembles for acute-leukemia detection in blood-smear images.

Importing leukax (or any of its modules) changes nothing in the process: no environment variable, no compiler
run, no native library. Process settings (XLA:CPU flags, the allocator) belong to programs: see
`leukax.runtime` and the README's performance section. The native CPU kernels are opt-in: `leukax.native`.
"""

__version__ = "0.1.0"
