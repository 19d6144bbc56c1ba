"""Opt-in native CPU kernels (C++ through the XLA FFI) and their build. Nothing here is used by default.

The default graph of every leukax model is pure JAX/XLA on every machine ("shift" depthwise convolutions on
CPU, "lax" elsewhere): it needs no compiler and compiles the same everywhere. For CPU finetuning, the native
depthwise convolution (`depthwise`, source `depthwise.cc`) is chosen explicitly:
``MobileNetV2(depthwise_impl="native")``, ``pretrained(name, cpu_kernels="native")`` or a program's
``--cpu_kernels=native``. Only then is the library compiled (`build`, g++ with ``-march=native``, cached under
``$XDG_CACHE_HOME/leukax/native``) and loaded. Its measured gain: results/benchmarks/README.md.

Importing this package or its modules builds and loads nothing.
"""
