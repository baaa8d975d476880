"""The CPU backend: a torch (and, on CPU tensors, NumPy) implementation of every operation of
:mod:`hvdcomp.kernels`, one module per family as the Triton kernels are (``residual``,
``adacomp``, ``ternary``, ``topk``, ``packing``, ``decode``, ``casts``), with the helpers
they share (``compare``: NumPy compares and ``nonzero``; ``random_streams``: Philox and
PCG64).

It runs for CPU tensors, and on any device when Triton is absent or
``HVDCOMP_KERNELS=reference``; its NumPy paths engage on CPU tensors only. Each function has
the signature and the contract of the operation of the same name in :mod:`hvdcomp.kernels`
(whose docstrings hold the contract); the docstrings here say how it is computed. Written
for speed on a CPU: vectorised (no Python loop over elements, bins or ranks), zero-copy
NumPy views where NumPy is faster than torch's CPU kernels, and a few module-level caches.
The tests check every function against a plain oracle (``tests/kernel_oracle.py``).
"""
