"""Triton kernels of vlfast (installed as ``vlfast.kernels``).

Each module holds private ``@triton.jit`` kernels and the host launchers that
allocate and launch them.  Validation and backend dispatch live in
``vlfast.ops``; import these modules lazily (importing Triton is slow, and
``TRITON_INTERPRET=1`` must be set before the kernels are decorated for them to
run on CPU tensors).
"""


def tile_tables():
    """The tile table of every kernel module, ``{name: TileTable}`` (imports Triton and the kernels).

    Each ``kernels._common.TileTable`` holds ``columns``, ``rows``, the ``kernels`` each kind
    sizes, the interpreter's entries (``interpreter``) and ``format()`` for text; ``vlfast info``
    prints them.  Force tiles in tests with ``kernels._common.override_tiles``.
    """
    from . import attention, contrastive, ema, masking

    return {m.TILES.name: m.TILES for m in (attention, contrastive, ema, masking)}
