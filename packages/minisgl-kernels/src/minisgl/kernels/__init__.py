"""minisgl's kernels: small JIT-built CUDA/C++ ops, each with a pure-torch reference.

Only the references exist so far (`minisgl.kernels.reference`); the JIT builds arrive in a later issue.
"""

__version__ = "0.1.0"
