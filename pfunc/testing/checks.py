"""``check_parametrization``: run Hypothesis over a parametrization and report every violated invariant.

>>> import torch
>>> from pfunc.parametrizations import Symmetric
>>> from pfunc.testing import strategies as S, constraints as C
>>> report = check_parametrization(Symmetric(), S.square_matrices(), constraint=C.symmetric(), max_examples=5)
>>> report.ok
True

How it runs: one Hypothesis search draws examples and checks every selected
property on each (so a passing check costs one search). If anything fails, that
search's shrunk example is the minimal one for the property it fails, and each
other property is then searched on its own, so every violated property is
reported with its own minimal example, and a
:class:`~pfunc.testing.report.ParametrizationCheckError` (an ``AssertionError``)
lists them all.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Optional, Sequence, Union

import hypothesis
from hypothesis import HealthCheck, Phase, Verbosity, given
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck, HypothesisException, InvalidArgument, Unsatisfiable
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from .constraints import Constraint, as_constraints
from .properties import PROPERTIES, BindError, InputError, NotApplicable, Spec, Violation, build_case
from .properties.base import raised
from .report import LEFT_OUT, CheckReport, ParametrizationCheckError, PropertyFailure
from .subject import Subject
from .tolerance import Tolerance

__all__ = ["check_parametrization", "parametrization_test", "hypothesis_settings"]

ConstraintSpec = Union[None, Constraint, Callable[[Tensor], Any], Sequence[Any]]


def hypothesis_settings(
    settings: Optional[hypothesis.settings] = None, max_examples: Optional[int] = None
) -> hypothesis.settings:
    """The settings a check runs under: ``settings`` (default: the active profile) with
    ``max_examples`` if given, no deadline (the first ``vmap``/``grad`` call is slow), one
    shrunk bug per search, no explain phase, ``too_slow`` suppressed, and Hypothesis's own
    printing off (the check's report says it all) unless the profile is verbose."""
    base = settings if settings is not None else hypothesis.settings()
    if max_examples is not None and not (isinstance(max_examples, int) and max_examples > 0):
        raise ValueError(f"check_parametrization: max_examples must be a positive int, got {max_examples!r}")
    overrides: dict[str, Any] = {
        "deadline": None,
        "report_multiple_bugs": False,
        # the explain phase re-runs the failing example hundreds of times to annotate Hypothesis's own
        # report, which the check replaces with its own
        "phases": tuple(p for p in base.phases if p != Phase.explain),
        "suppress_health_check": sorted(set(base.suppress_health_check) | {HealthCheck.too_slow}, key=lambda h: h.value),
    }
    if base.verbosity <= Verbosity.normal:
        overrides["verbosity"] = Verbosity.quiet
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    return hypothesis.settings(base, **overrides)


class _Search:
    """One Hypothesis search over ``names``: counts examples, records the last violation."""

    def __init__(self, spec: Spec, names: Sequence[str]):
        self.spec = spec
        self.names = tuple(names)
        self.examples = 0
        self.applicable = {n: 0 for n in self.names}
        self.not_applicable: dict[str, str] = {}
        self.structural: dict[str, str] = {}  # not applicable to any example, whatever is drawn
        self.last: Optional[PropertyFailure] = None
        self.input_error: Optional[InputError] = None

    def body(self, data: Any) -> None:
        try:
            case = build_case(self.spec, data)
        except InputError as error:
            self.input_error = error
            raise
        except BindError as error:
            if "forward_runs" not in self.names:
                return  # forward_runs reports it
            self.last = PropertyFailure("forward_runs", error.message, error.example)
            raise
        except HypothesisException:
            raise
        except Exception as error:  # e.g. a states= function that raises: a report, not a traceback
            self.last = PropertyFailure("forward_runs", raised("the check crashed while drawing and binding the example: it", error), "")
            raise
        applied = []
        # Once an example has failed, Hypothesis shrinks it: only the property it failed runs from then on,
        # so the shrunk example is that property's minimal one (and shrinking costs one property, not all).
        names = self.names if self.last is None else (self.last.property,)
        for name in names:
            try:
                PROPERTIES[name](self.spec, case.fresh(), data)
            except NotApplicable as reason:
                self.not_applicable.setdefault(name, reason.reason)
                if reason.structural:
                    self.structural.setdefault(name, reason.reason)
                continue
            except InputError as error:
                self.input_error = error
                raise
            except Violation as violation:
                example = case.describe() + (f"\n{violation.details}" if violation.details else "")
                self.last = PropertyFailure(name, violation.message, example)
                raise
            except HypothesisException:
                raise
            except Exception as error:  # the kit or the user's code crashed outside a guarded call: say where
                message = raised(f"the check crashed while running property {name}: it", error)
                self.last = PropertyFailure(name, message, case.describe())
                raise
            applied.append(name)
        # counted only now: Hypothesis may abort an example midway (a draw past its buffer)
        for name in applied:
            self.applicable[name] += 1
        self.examples += 1

    def run(self, settings: hypothesis.settings) -> Optional[PropertyFailure]:
        """``None`` if every property held on every example, else the (shrunk) failure."""

        self.spec.new_search()

        @hypothesis.settings(settings)
        @given(data=st.data())
        def search(data: Any) -> None:
            self.body(data)

        try:  # a distinct digest per subject and property set: its own seed and database entries
            search.hypothesis.inner_test._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
                f"{self.spec.subject.name}|{'|'.join(self.names)}".encode()
            )
        except AttributeError:
            pass
        try:
            search()
        except (Unsatisfiable, FailedHealthCheck, InvalidArgument):
            raise
        except Exception as error:
            if self.input_error is not None:
                raise ValueError(f"check_parametrization: {self.input_error}") from error
            if self.last is None:
                raise
            return self.last
        return None


def check_parametrization(
    parametrization: Any,
    inputs: SearchStrategy[Any],
    *,
    constraint: ConstraintSpec = None,
    image: Optional[SearchStrategy[Tensor]] = None,
    reference: Optional[Callable[..., Any]] = None,
    states: Optional[Callable[[tuple[Tensor, ...]], SearchStrategy[Any]]] = None,
    warmup: int = 0,
    converges_to: Optional[Callable[..., Tensor]] = None,
    convergence_steps: int = 50,
    unsafe: bool = False,
    batched: Optional[bool] = None,
    non_differentiable: Collection[Union[str, int]] = (),
    properties: Optional[Collection[str]] = None,
    skip: Collection[str] = (),
    tolerance: Optional[Tolerance] = None,
    batch_size: int = 3,
    costly_examples: int = 2,
    max_examples: Optional[int] = None,
    settings: Optional[hypothesis.settings] = None,
    name: Optional[str] = None,
    all_failures: bool = True,
) -> CheckReport:
    """Check the invariants of ``parametrization`` (one, or a list: a chain) on inputs drawn by Hypothesis.

    Args:
        parametrization: anything :func:`pfunc.parametrize` accepts (plain, torch-style
            ``nn.Module``, stateful), or a list of them applied first to last.
        inputs: strategy drawing the originals: a Tensor, or a tuple of them for a
            parametrization of several originals (e.g. weight norm's ``(g, v)``); a tuple of
            strategies, one per original, is taken as ``hypothesis.strategies.tuples(...)``.
        constraint: what forward's output satisfies: a :class:`~pfunc.testing.constraints.Constraint`
            (``constraints.symmetric()``...), a callable ``Y -> bool``, or a list of them.
        image: strategy drawing points ``Y`` of the image for the round trip (default: ``forward(X)``).
            Drawn ``Y`` are registered with :func:`pfunc.parametrize`, so stateful steps get the
            state registration gives them.
        reference: ``reference(*originals) -> Y`` to compare forward with (e.g. the
            ``torch.nn.utils.parametrize`` version, :func:`~pfunc.testing.torch_reference`).
            If it takes ``state`` and ``training`` keywords, a stateful chain calls
            ``reference(*originals, state=..., training=...)`` (a dict, or a list of dicts for
            a chain), which may return ``(Y, new_state)`` to compare the new state too.
        states: ``states(originals)`` -> strategy drawing the state (a dict; a list of dicts
            for a chain) instead of ``init``'s.
        warmup: training-mode calls applied to the state before the checks (for a constraint
            that holds once the state has converged, e.g. BigGAN spectral norm).
        converges_to: ``converges_to(*originals)``: the value forward (eval) must reach after
            ``convergence_steps`` training calls.
        unsafe: the parametrization may change shape or dtype (as ``register_parametrization``).
        batched: the parametrization accepts leading batch dims, so a call on ``stack(x_i)`` must equal
            ``stack(forward(x_i))``; ``None`` (default): inferred, true for inputs drawn by
            :mod:`~pfunc.testing.strategies`' matrix strategies with a ``batch_shape``; ``False``: never
            (e.g. a conv kernel's first dim is its output channels, not a batch).
        non_differentiable: originals meant to get no gradient (``"X"``, ``"original1"``, or an index):
            ``gradient_reaches_every_original`` leaves them out.
        properties, skip: the property names to check (default: all of
            :data:`~pfunc.testing.PROPERTIES`) and to leave out; ``forward_runs``
            is always checked (the others leave a crashing forward to it).
        tolerance: a :class:`~pfunc.testing.tolerance.Tolerance` for every comparison
            (default: per dtype, ``rtol = sqrt(eps)``, ``atol = eps ** 0.75``).
        batch_size: examples stacked for ``vmap_matches_loop`` and ``batched_forward_matches_per_item``
            (inputs drawn with another shape are left out).
        costly_examples: examples per search on which the costly properties run (training steps, the
            domain's edge; finite differences on ``5 *`` as many, ``torch.compile`` on one).
        max_examples, settings: Hypothesis overrides (default: the active profile).
        name: what the report calls the parametrization (default: its repr).
        all_failures: after a failure, search each other property alone so that every violated one is
            reported with its own minimal example (default); ``False`` stops at the first.

    Returns:
        a :class:`~pfunc.testing.report.CheckReport` (examples run, properties checked and skipped,
        warnings from the edge of the domain, notes such as graph breaks).

    Raises:
        ParametrizationCheckError: some property failed; its message lists each one with the
            minimal failing input and the observed discrepancy.
        ValueError, TypeError: bad arguments, or a strategy that draws something unusable.
    """
    __tracebackhide__ = True  # pytest: show the report, not this function's source
    subject = Subject.of(parametrization, unsafe=unsafe, name=name)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(s, SearchStrategy) for s in inputs):
        inputs = st.tuples(*inputs)  # one strategy per original
    if not isinstance(inputs, SearchStrategy):
        raise TypeError(f"check_parametrization: inputs must be a Hypothesis strategy, got {type(inputs).__name__}")
    if image is not None and not isinstance(image, SearchStrategy):
        raise TypeError(f"check_parametrization: image must be a Hypothesis strategy, got {type(image).__name__}")
    for what, fn in (("reference", reference), ("states", states), ("converges_to", converges_to)):
        if fn is not None and not callable(fn):
            raise TypeError(f"check_parametrization: {what} must be callable, got {type(fn).__name__}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"check_parametrization: warmup must be a non-negative int, got {warmup!r}")
    if not (isinstance(convergence_steps, int) and convergence_steps >= 0):
        raise ValueError(f"check_parametrization: convergence_steps must be a non-negative int, got {convergence_steps!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"check_parametrization: batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(costly_examples, int) and costly_examples >= 1):
        raise ValueError(f"check_parametrization: costly_examples must be a positive int, got {costly_examples!r}")
    if batched not in (None, True, False):
        raise TypeError(f"check_parametrization: batched must be None, True or False, got {batched!r}")
    if isinstance(non_differentiable, (str, int)):
        non_differentiable = (non_differentiable,)
    for item in non_differentiable:
        if not (isinstance(item, int) or (isinstance(item, str) and (item == "X" or item.startswith("original")))):
            raise ValueError(
                f"check_parametrization: non_differentiable takes original names ('X', 'original0', ...) or indices, got {item!r}"
            )
    names = _select(properties, skip)
    spec = Spec(
        subject=subject,
        inputs=inputs,
        constraints=as_constraints(constraint),
        image=image,
        reference=reference,
        states=states,
        warmup=warmup,
        converges_to=converges_to,
        convergence_steps=convergence_steps,
        tolerance=tolerance,
        batch_size=batch_size,
        selected=frozenset(names),
        batched=batched,
        non_differentiable=frozenset(non_differentiable),
        costly_examples=costly_examples,
    )
    run_settings = hypothesis_settings(settings, max_examples)
    search = _Search(spec, names)
    first = search.run(run_settings)
    report = CheckReport(subject.name, examples=search.examples)
    report.checked = {n: k for n, k in search.applicable.items() if k > 0}
    report.skipped = {n: search.not_applicable.get(n, "not applicable to any example") for n, k in search.applicable.items() if k == 0}
    report.skipped.update({n: LEFT_OUT for n in PROPERTIES if n not in names})
    report.warnings, report.notes = list(spec.warnings), list(spec.notes)
    if first is None:
        return report
    # Something failed. The shrunk example fails `first.property` (the first property in order that
    # failed; shrinking ran only it): it is that property's minimal example.
    # Every other property is searched alone, so each violated one gets its own minimal example
    # (and the report's counts come from these complete searches).
    failures = [first]
    report.checked, report.skipped = {}, {n: LEFT_OUT for n in PROPERTIES if n not in names}
    report.examples = 0  # from here: the most examples any passing property ran
    for n in names if all_failures else ():
        if n == first.property:
            continue
        if n in search.structural and not search.applicable[n]:  # cannot apply to any example: no search
            report.skipped[n] = search.structural[n]
            continue
        single = _Search(spec, [n])
        failure = single.run(run_settings)
        if failure is not None:
            failures.append(failure)
            continue
        report.examples = max(report.examples, single.examples)
        if single.applicable[n]:
            report.checked[n] = single.applicable[n]
        else:
            report.skipped[n] = single.not_applicable.get(n, "not applicable to any example")
    order = list(PROPERTIES)
    report.failures = sorted(failures, key=lambda f: order.index(f.property))
    report.warnings, report.notes = list(spec.warnings), list(spec.notes)
    raise ParametrizationCheckError(report)


def _select(properties: Optional[Collection[str]], skip: Collection[str]) -> list[str]:
    valid = list(PROPERTIES)
    if isinstance(properties, str) or isinstance(skip, str):
        raise TypeError("check_parametrization: properties and skip take a collection of names, not one string")
    chosen = valid if properties is None else list(properties)
    unknown = [n for n in list(chosen) + list(skip) if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"check_parametrization: unknown properties {unknown}; valid names: {valid}")
    if "forward_runs" in skip:
        raise ValueError("check_parametrization: forward_runs cannot be skipped (every other property relies on it)")
    if properties is not None and not [n for n in chosen if n not in skip]:
        raise ValueError("check_parametrization: no property left to check")
    return [n for n in valid if n == "forward_runs" or (n in chosen and n not in skip)]


def parametrization_test(parametrization: Any, inputs: SearchStrategy[Any], **kwargs: Any) -> Callable[[], None]:
    """A pytest test function running :func:`check_parametrization` with these arguments: the one-line test.

    >>> from pfunc.parametrizations import Skew
    >>> from pfunc.testing import strategies as S, constraints as C
    >>> test_skew = parametrization_test(Skew(), S.square_matrices(), constraint=C.skew())
    """
    label = kwargs.get("name") or Subject.of(parametrization, unsafe=kwargs.get("unsafe", False)).name

    def test() -> None:
        check_parametrization(parametrization, inputs, **kwargs)

    test.__doc__ = f"The invariants of pfunc.testing hold for {label}."
    return test
