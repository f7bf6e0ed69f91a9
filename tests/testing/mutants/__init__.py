"""A mutation suite for ``pfunc.testing``: correct parametrizations people write, and realistic buggy variants.

:mod:`.subjects` holds the correct parametrizations (each with the check a user would write for it),
:mod:`.mutants` the buggy variants (each naming the bug, the kind of bug, and the property that must
catch it), :mod:`.score` runs the kit on all of them. ``python -m tests.testing.mutation_score`` prints
the table; ``tests/testing/test_mutation_suite.py`` asserts it.
"""
