"""Print the mutation score of ``pfunc.testing``: ``python -m tests.testing.mutation_score [MUTANT ...]``.

Runs the kit, as a user would, on the correct parametrizations of :mod:`tests.testing.mutants.subjects`
and on every buggy variant of :mod:`tests.testing.mutants.catalog`, and prints which property caught
each bug (``--verbose``: the kit's report for each).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutants", nargs="*", help="only these mutants (default: all)")
    parser.add_argument("--max-examples", type=int, default=None, help="examples per check (default: the suite's)")
    parser.add_argument("--verbose", action="store_true", help="print each report")
    args = parser.parse_args(argv)

    import torch
    from hypothesis import settings

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings.register_profile("mutation", derandomize=True, deadline=None, print_blob=False)
    settings.load_profile("mutation")
    from tests.testing.mutants.score import MAX_EXAMPLES, score, table

    result = score(args.mutants or None, args.max_examples or MAX_EXAMPLES)
    if args.verbose:
        for n, o in result.subjects.items():
            print(f"===== {n}\n{o.crash or o.text}\n")
        for m, o, _ in result.mutants:
            print(f"===== {m.name}\n{o.crash or o.text}\n")
    print(table(result))
    return 0 if result.caught == len(result.mutants) and not result.false_alarms else 1


if __name__ == "__main__":
    sys.exit(main())
