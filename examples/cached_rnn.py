"""An orthogonal RNN on the adding problem, with its recurrent kernel materialised once per sequence.

The recurrent kernel is ``Cayley(Skew(X))`` (or ``MatrixExp(Skew(X))``), as in PyTorch's
parametrizations tutorial. With ``torch.nn.utils.parametrize`` every read
of ``cell.recurrent.weight`` inside the time loop recomputes the map unless the loop
sits in ``parametrize.cached()``; with pfunc the cache is explicit:
``values, state = cell.materialize(params, state)`` once, then
``cell.apply(values, x_t, h)`` at every step. A counting wrapper around the map
reports how many times it ran; the same run times a training step both ways (and
torch's ``parametrize`` with and without ``cached()`` as a reference), then trains
the cached model and compares its test loss with the trivial predictor's.

Run from the repository root::

    python -m examples.cached_rnn                 # about 30 s on 2 CPU cores
    python -m examples.cached_rnn --steps 20 --seq-len 20 --timing-budget 1 --timing-repeats 2   # smoke test

Each run writes a new folder ``<--results-dir>/<YYYY-mm-dd_HH-MM-SS>_<map>/`` (default
``--results-dir results/cached_rnn``; a previous run is never overwritten) with ``metrics.json``
and ``loss.png``. Progress (loss, time left) goes to standard error.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

import pfunc as pf
from benchmarks.timing import measure
from examples import arguments as A
from examples.atomic import write_atomically
from examples.threads import choose_threads
from examples.plots import save_line_plot
from examples.progress import progress
from examples.run_folder import run_in_new_folder
from pfunc.parametrizations import Cayley, MatrixExp, Skew

__all__ = [
    "CountingMap",
    "OrthogonalRNNCell",
    "adding_problem",
    "build",
    "forward_cached",
    "forward_per_step",
    "compare_caching",
    "train",
    "main",
]


class _Tally:
    """A count held by reference: the copies of a module that pfunc runs share it with the module."""

    def __init__(self) -> None:
        self.n = 0


class CountingMap(nn.Module):
    """Wraps a parametrization and counts its forward calls in ``calls``.

    An ``nn.Module`` so that ``torch.nn.utils.parametrize`` accepts it too; pfunc calls
    it like any torch-style parametrization. pfunc never writes to a module: it runs the
    forward on a private shadow of it, which shares the module's attributes but not their
    rebinding, so the count lives in a shared object (``self.calls += 1`` would count on the
    shadow only). ``right_inverse`` is passed through when the wrapped map has one
    (``NotImplementedError`` otherwise: the identity at registration, as torch).
    """

    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn
        self.tally = _Tally()

    @property
    def calls(self) -> int:
        """Forward calls so far (assign 0 to restart the count)."""
        return self.tally.n

    @calls.setter
    def calls(self, value: int) -> None:
        self.tally.n = value

    def forward(self, X: Tensor) -> Tensor:
        self.tally.n += 1
        return self.fn(X)

    def right_inverse(self, Y: Tensor) -> Tensor:
        inverse = getattr(self.fn, "right_inverse", None)
        if inverse is None:
            raise NotImplementedError(f"{type(self.fn).__name__} has no right_inverse")
        return inverse(Y)


class OrthogonalRNNCell(nn.Module):
    """``h' = relu(W_in x + b + W_rec h)``; ``W_rec`` is what gets parametrized orthogonal.

    ReLU with an orthogonal kernel started at the identity (Le et al.'s IRNN, kept
    orthogonal throughout) carries the marked values across the sequence.

    Shapes: ``x (B, input_size)``, ``h (B, hidden_size)`` -> ``(B, hidden_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.relu(self.input(x) + self.recurrent(h))


def adding_problem(batch: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Hochreiter's adding problem: ``(xs (T, B, 2), target (B,))``.

    Channel 0 holds uniform values, channel 1 marks one position in each half of the
    sequence; the target is the sum of the two marked values. Predicting the constant
    1 scores an MSE of ``Var(U + U') = 1/6``.
    """
    if seq_len < 2:
        raise ValueError(f"adding_problem: seq_len must be at least 2, got {seq_len}")
    values = torch.rand(batch, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    markers = torch.zeros(batch, seq_len)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    xs = torch.stack([values, markers], dim=-1).transpose(0, 1).contiguous()
    return xs, target


def build(hidden: int, orthogonal_map: str, seed: int):
    """``(cell, head, params, state, counter)``: the parametrized cell, a plain ``nn.Linear`` head,
    pfunc's ``(params, state)`` with the kernel starting at the identity (a zero skew-symmetric
    generator: ``Cayley(0) = exp(0) = I``), and the :class:`CountingMap` around the orthogonal map."""
    if orthogonal_map not in ("cayley", "matrix_exp"):
        raise ValueError(f"orthogonal_map must be 'cayley' or 'matrix_exp', got {orthogonal_map!r}")
    torch.manual_seed(seed)
    module = OrthogonalRNNCell(2, hidden)
    head = nn.Linear(hidden, 1)
    counter = CountingMap(Cayley() if orthogonal_map == "cayley" else MatrixExp())
    cell = pf.parametrize(module, {"recurrent.weight": [Skew(), counter]})
    params, state = cell.init(generator=torch.Generator().manual_seed(seed))
    key = pf.tree.original_key("recurrent.weight", "original")
    params[key] = torch.zeros_like(params[key]).requires_grad_()
    counter.calls = 0
    return cell, head, params, state, counter


def forward_cached(cell: pf.Parametrized, head: nn.Module, params, state, xs: Tensor) -> tuple[Tensor, dict]:
    """Predictions ``(B,)``: the kernel materialised once, reused at every one of the ``T`` steps."""
    values, state = cell.materialize(params, state, training=True)
    h = xs.new_zeros(xs.shape[1], head.in_features)
    for x_t in xs:
        h = cell.apply(values, x_t, h)
    return head(h).squeeze(-1), state


def forward_per_step(cell: pf.Parametrized, head: nn.Module, params, state, xs: Tensor) -> tuple[Tensor, dict]:
    """Predictions ``(B,)``: ``cell(params, state, ...)`` at every step, so the kernel is materialised ``T`` times."""
    h = xs.new_zeros(xs.shape[1], head.in_features)
    for x_t in xs:
        h, state = cell(params, state, x_t, h, training=True)
    return head(h).squeeze(-1), state


def _torch_twin(cell: pf.Parametrized, params, state, counter: CountingMap) -> nn.Module:
    """The same cell parametrized in place by torch (same values), its map counted by ``counter``."""
    module = copy.deepcopy(cell.module)
    torch_parametrize.register_parametrization(module.recurrent, "weight", _TorchSkew())
    torch_parametrize.register_parametrization(module.recurrent, "weight", counter)
    values, _ = cell.materialize(params, state, training=False)
    with torch.no_grad():
        module.input.weight.copy_(values["input.weight"])
        module.input.bias.copy_(values["input.bias"])
        module.recurrent.parametrizations.weight.original.copy_(params["recurrent.parametrizations.weight.original"])
    return module


class _TorchSkew(nn.Module):
    """pfunc's :class:`Skew` as the ``nn.Module`` torch's ``register_parametrization`` requires."""

    def forward(self, X: Tensor) -> Tensor:
        return Skew()(X)

    def right_inverse(self, A: Tensor) -> Tensor:
        return Skew().right_inverse(A)


def compare_caching(
    hidden: int, seq_len: int, batch: int, orthogonal_map: str, seed: int, budget_s: float = 5.0, min_repeats: int = 5
) -> dict:
    """Forward + backward of one batch, four ways, timed interleaved in this run (medians, see
    :func:`benchmarks.timing.measure`); and how many times each ran the orthogonal map."""
    cell, head, params, state, counter = build(hidden, orthogonal_map, seed)
    xs, target = adding_problem(batch, seq_len, torch.Generator().manual_seed(seed + 1))
    twin_counter = CountingMap(counter.fn)
    twin = _torch_twin(cell, params, state, twin_counter)

    def pfunc_step(forward):
        def step():
            out, _ = forward(cell, head, params, state, xs)
            ((out - target) ** 2).mean().backward()
        return step

    def torch_step(cached: bool):
        def run():
            h = xs.new_zeros(batch, hidden)
            for x_t in xs:
                h = twin(x_t, h)
            ((head(h).squeeze(-1) - target) ** 2).mean().backward()

        def step():
            if cached:
                with torch_parametrize.cached():
                    run()
            else:
                run()
        return step

    # the four variants compute the same predictions
    with torch.no_grad():
        out_cached, _ = forward_cached(cell, head, params, state, xs)
        out_step, _ = forward_per_step(cell, head, params, state, xs)
        h = xs.new_zeros(batch, hidden)
        for x_t in xs:
            h = twin(x_t, h)
        out_torch = head(h).squeeze(-1)
    max_diff = max(float((out_cached - out_step).abs().max()), float((out_cached - out_torch).abs().max()))

    variants = {
        "pfunc_cached": (pfunc_step(forward_cached), counter),
        "pfunc_per_step": (pfunc_step(forward_per_step), counter),
        "torch_cached": (torch_step(True), twin_counter),
        "torch_uncached": (torch_step(False), twin_counter),
    }
    calls = {}
    for name, (step, ctr) in variants.items():
        ctr.calls = 0
        step()
        calls[name] = ctr.calls
    timing = measure({name: step for name, (step, _) in variants.items()}, budget_s=budget_s, min_repeats=min_repeats, warmup=2)
    result: dict[str, Any] = {"max_abs_diff_between_variants": max_diff, "timing_repeats": timing.repeats}
    for name in variants:
        result[name] = {
            "map_calls_per_sequence": calls[name],
            "seconds_per_step": timing.medians[name],
            "iqr_fraction": timing.iqr_fraction(name),
        }
    result["speedup_cached_over_per_step"] = result["pfunc_per_step"]["seconds_per_step"] / result["pfunc_cached"]["seconds_per_step"]
    return result


def train(
    hidden: int,
    seq_len: int,
    batch: int,
    steps: int,
    lr: float,
    orthogonal_map: str,
    seed: int,
    log_every: int = 100,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> dict:
    """Train the cached model; returns the loss curve, the test MSE and the trivial predictor's.

    ``log`` gets a line every ``log_every`` steps, ``on_step(step, loss)`` every step (a progress bar)."""
    cell, head, params, state, counter = build(hidden, orthogonal_map, seed)
    opt = torch.optim.Adam([*params.values(), *head.parameters()], lr=lr)
    g = torch.Generator().manual_seed(seed + 2)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        xs, target = adding_problem(batch, seq_len, g)
        out, state = forward_cached(cell, head, params, state, xs)
        loss = ((out - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*params.values(), *head.parameters()], 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        on_step(step, losses[-1])
        if step % log_every == 0 or step == steps:
            recent = statistics.fmean(losses[-log_every:])
            log(f"step {step:5d}  mse {recent:.4f}  ({time.perf_counter() - t0:.1f}s)")
    train_calls = counter.calls
    train_seconds = time.perf_counter() - t0
    xs, target = adding_problem(2048, seq_len, torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        out, _ = forward_cached(cell, head, params, state, xs)
    values, _ = cell.materialize(params, state, training=False)
    W = values["recurrent.weight"]
    return {
        "losses": losses,
        "test_mse": float(((out - target) ** 2).mean()),
        "trivial_mse": float(((1.0 - target) ** 2).mean()),
        "map_calls": train_calls,
        "steps": steps,
        "orthogonality_error": float((W.T @ W - torch.eye(hidden)).abs().max().detach()),
        "train_seconds": train_seconds,
    }


def _running_mean(xs: list[float], window: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i + 1 - window) : i + 1]) for i in range(len(xs))]


def _parser() -> argparse.ArgumentParser:
    p = A.ArgumentParser(prog="python -m examples.cached_rnn", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=A.positive_int, default=64, help="hidden size of the trained model")
    p.add_argument("--seq-len", type=A.positive_int, default=50, help="sequence length T of the adding problem (at least 2)")
    p.add_argument("--batch", type=A.positive_int, default=64, help="sequences per batch")
    p.add_argument("--steps", type=A.positive_int, default=2500, help="training steps (cached model)")
    p.add_argument("--lr", type=A.positive_float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--map", dest="orthogonal_map", choices=("cayley", "matrix_exp"), default="cayley",
                   help="the orthogonal map after Skew")
    p.add_argument("--timing-budget", type=A.positive_float, default=10.0, help="seconds for the timing comparison")
    p.add_argument("--timing-repeats", type=A.positive_int, default=5, help="at least this many timed rounds (medians)")
    p.add_argument("--timing-hidden", type=A.positive_int, default=128, help="hidden size of the timing comparison")
    p.add_argument("--threads", type=A.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy machine)")
    p.add_argument("--seed", type=A.seed, default=0, help="seed of the initialisation and the data")
    p.add_argument("--results-dir", default="results/cached_rnn",
                   help="parent of the run folder <YYYY-mm-dd_HH-MM-SS>_<map> (default results/cached_rnn)")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line: time the four variants, train, score, write. Returns the metrics (with
    ``"run_folder"`` and the losses). Bad flags exit with status 2, an unusable results folder
    with 1, Ctrl-C with 130 (a run folder with nothing in it yet is removed), each with one line."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error(f"argument --seq-len: the adding problem needs at least 2 steps, got {args.seq_len}")
    return run_in_new_folder(args.results_dir, args.orthogonal_map, lambda out: _run(args, out))


def _run(args: argparse.Namespace, out: Path) -> dict:
    note = choose_threads(args.threads)
    if note:
        print(note, file=sys.stderr)
    print(f"run folder: {out}")
    print(f"timing one training step (forward + backward; hidden {args.timing_hidden}, T {args.seq_len}, batch {args.batch})")
    timing = compare_caching(
        args.timing_hidden, args.seq_len, args.batch, args.orthogonal_map, args.seed, args.timing_budget, args.timing_repeats
    )
    for name in ("pfunc_cached", "pfunc_per_step", "torch_cached", "torch_uncached"):
        r = timing[name]
        print(f"  {name:15s} map ran {r['map_calls_per_sequence']:4d}x per sequence   {1e3 * r['seconds_per_step']:8.2f} ms/step")
    print(f"  cached is {timing['speedup_cached_over_per_step']:.2f}x faster than materialising per step "
          f"(medians of {timing['timing_repeats']} interleaved rounds; outputs agree to {timing['max_abs_diff_between_variants']:.1e})")
    print(f"training the cached model: {args.steps} steps, T {args.seq_len}, hidden {args.hidden}")
    window = 50
    with progress(args.steps, desc="train", unit="step", log_every=max(1, args.steps // 10)) as bar:
        recent: list[float] = []

        def on_step(step: int, loss: float) -> None:
            recent.append(loss)
            del recent[:-window]
            bar.update(mse=statistics.fmean(recent))

        result = train(args.hidden, args.seq_len, args.batch, args.steps, args.lr, args.orthogonal_map, args.seed,
                       log=lambda line: None, on_step=on_step)
    print(f"test mse {result['test_mse']:.4f} vs trivial predictor {result['trivial_mse']:.4f}; "
          f"map ran {result['map_calls']} times in {result['steps']} steps; "
          f"|W^T W - I|max {result['orthogonality_error']:.1e}")
    metrics = {"timing": timing, **{k: v for k, v in result.items() if k != "losses"}, "args": {k: str(v) for k, v in vars(args).items()}}
    write_atomically(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()), what="cached_rnn")
    curve = _running_mean(result["losses"], window)
    save_line_plot(out / "loss.png", {f"train mse (mean of the last {window} steps)": curve,
                                      "trivial predictor (always 1)": [result["trivial_mse"]] * len(curve)},
                   title=f"adding problem, T={args.seq_len}, {args.orthogonal_map} map", ylabel="mean squared error",
                   x=list(range(1, len(curve) + 1)), log_y=True)
    print(f"wrote metrics.json and loss.png in {out}")
    return {**metrics, "losses": result["losses"], "run_folder": str(out)}


if __name__ == "__main__":
    main()
