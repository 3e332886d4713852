"""The ``smlp`` command-line app (installed as the import package ``smlp_cli``).

A thin shell: one module per command, each calling library functions in ``smlp_export``.
Heavy imports (torch, onnx, onnxruntime) happen inside the command bodies so ``smlp --help`` is fast.
"""
