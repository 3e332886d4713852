"""TensorRT plugins for the smlp plugin nodes, one subpackage each (README.md + plugin.py).

The top-level ``plugins/`` folder of the source tree, shipped in the wheel as its own package
``smlp_plugins`` (``smlp_plugins.<name>.plugin``), so engines can be built from an installed
package, not only from a source checkout. It sits above ``smlp_export``: it reads the node contract
(``smlp_export.export.contract``) and the kernels from there, and ``smlp_export`` never imports it
(the CLI's ``build-engine`` does). ``build_engine`` lives here because building an engine starts by
registering these plugins. Importing this package needs neither TensorRT nor Triton: ``tensorrt``
is imported inside each plugin's ``register()``.
"""
