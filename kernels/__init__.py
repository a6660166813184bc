"""Triton kernels of vlfast (installed as ``vlfast.kernels``).

Each module holds private ``@triton.jit`` kernels and the host launchers that
allocate and launch them.  Validation and backend dispatch live in
``vlfast.ops``; import these modules lazily (importing Triton is slow, and
``TRITON_INTERPRET=1`` must be set before the kernels are decorated for them to
run on CPU tensors).
"""
