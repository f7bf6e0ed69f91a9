"""Side-by-side benchmarks of pfunc against ``torch.nn.utils.parametrize`` and hand-written code.

One module per comparison family (``layers``, ``caching``, ``ensembles``,
``power_iteration``, ``compiled``, ``unet``); each yields :class:`~benchmarks.comparison.Comparison`
rows whose variants are first checked equal, then timed interleaved.
``python -m benchmarks.run`` runs them all and writes ``BENCHMARKS.md``.
"""
