"""TensorRT plugins for the smlp plugin nodes, one subpackage each (README.md + plugin.py).

Shipped in the wheel (``smlp_export.plugins.<name>.plugin``), so engines can be built from an
installed package, not only from a source checkout. Importing this package needs neither TensorRT
nor Triton: ``tensorrt`` is imported inside each plugin's ``register()``.
"""
