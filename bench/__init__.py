"""vlfast benchmarks (installed as ``vlfast.bench``).

Run with ``vlfast bench ...`` or ``python -m vlfast.bench.harness ...``; see
:func:`vlfast.bench.harness.main`. Each op has a module here (listed in
``harness.MODULES``) whose ``@register(op)`` functions yield :class:`harness.Case`.
"""
