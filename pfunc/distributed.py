"""Data-parallel training with functional gradients: ``torch.distributed`` collectives over pytrees.

DDP's reducer averages gradients from autograd hooks on a module's parameters, so it
never sees a gradient computed functionally (``torch.func.grad``, or
``torch.autograd.grad`` on fresh leaves). A functional loop averages its gradient
tree itself, with the same engine DDP uses: this module packs the tree's tensors into
a few large flat buckets per (device, dtype), capped at ``bucket_cap_mb`` like DDP's,
and runs one ``torch.distributed`` collective per bucket. Inputs are never written;
results are new tensors.

* :func:`all_reduce`: the mean (or sum) of a tree across ranks; ``async_op=True``
  returns a :class:`Pending` whose ``wait()`` gives the tree.
* :func:`all_reduce_grad` / :func:`all_reduce_in_backward`: the gradient of a loss,
  averaged, with each bucket's all-reduce launched *during* the backward the moment
  its gradients are ready (tensor hooks on the inputs, buckets filled in the order the
  autograd graph will produce them), overlapping communication with the rest of it.
* :func:`broadcast`: a tree from rank ``src`` (initial params and state; module
  buffers, by DDP's rule).
* :func:`check_identical`, :func:`check_same_structure`: cheap checks that every rank
  holds the same tree (values, or keys/shapes/dtypes), naming the first differing key.

Every function is collective: every rank of ``group`` calls it, in the same order.
Structure is checked before the payload (``check=True``), so mismatched keys or
shapes are a :class:`ValueError` on every rank rather than a hang; a peer that dies
or stalls past the process group's timeout (``init_process_group(timeout=...)``)
is a :class:`CollectiveError`.

>>> import datetime, tempfile, torch, torch.distributed as dist, pfunc as pf
>>> store = tempfile.NamedTemporaryFile(delete=False).name
>>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
...                         timeout=datetime.timedelta(seconds=60))
>>> grads = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float64)}
>>> mean = pf.distributed.all_reduce(grads)              # every rank gets the mean over ranks
>>> mean["w"].shape, mean["b"].dtype
(torch.Size([2, 3]), torch.float64)
>>> pf.distributed.check_identical(mean)                 # raises on a rank whose values differ
>>> dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveError",
    "Pending",
    "all_reduce",
    "all_reduce_grad",
    "all_reduce_in_backward",
    "broadcast",
    "check_identical",
    "check_same_structure",
    "bucket_plan",
    "DEFAULT_BUCKET_CAP_MB",
]

Tree = Any
Op = Literal["mean", "sum"]

#: DDP's default bucket size (``bucket_cap_mb=25``).
DEFAULT_BUCKET_CAP_MB = 25.0
_MB = 1024 * 1024

# Device types each backend moves tensors on, for torch builds without
# ``get_backend_config`` / ``Backend.backend_capability``.
_KNOWN_BACKEND_DEVICES = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"}}


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died, or stalled past the process group's timeout."""


# ---------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class _Group:
    pg: Any  # ProcessGroup, or None for the default group (what torch.distributed's functions take)
    rank: int
    size: int
    device_types: Optional[frozenset[str]]  # None: a backend we know nothing about (no device check)

    def gather_device(self, where: str) -> torch.device:
        """Where small bookkeeping tensors (hashes, fingerprints) go for an all-gather."""
        if self.device_types is None or "cpu" in self.device_types or "cuda" not in self.device_types:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError(f"{where}: the process group's backend moves CUDA tensors only, and CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())


def _group(group: Any, where: str) -> _Group:
    if not dist.is_available():
        raise RuntimeError(f"{where}: this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{where}: no process group is initialised; call torch.distributed.init_process_group(...) "
            "first (under torchrun: init_process_group('gloo') on CPU, 'nccl' on CUDA)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{where}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: group does not contain this process (global rank {dist.get_rank()})")
    return _Group(group, rank, dist.get_world_size(group), _backend_device_types(group))


def _backend_device_types(group: Any) -> Optional[frozenset[str]]:
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is not None:
        config = str(get_config(group))  # "cpu:gloo,cuda:gloo", "cuda:nccl", "cpu:gloo,cuda:nccl"
        if ":" in config:
            return frozenset(part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part)
    backend = str(dist.get_backend(group))
    capability = getattr(dist.Backend, "backend_capability", {})
    if backend in capability:
        return frozenset(capability[backend])
    known = _KNOWN_BACKEND_DEVICES.get(backend)
    return frozenset(known) if known is not None else None


def _run(where: str, what: str, g: _Group, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a collective (or ``Work.wait``), turning a backend failure into a CollectiveError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        raise
    except RuntimeError as e:  # DistBackendError, gloo's "Connection reset by peer", "Timed out ..."
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"{where}: {what} failed on rank {g.rank} of {g.size}: {first} -- a peer rank probably "
            "died, or stalled past the process group's timeout (init_process_group(timeout=...))"
        ) from e


# ---------------------------------------------------------------------- trees
def _path(path: Sequence[Any]) -> str:
    if not path:
        return "<root>"
    return ".".join(str(p) for p in path)


@dataclass(frozen=True)
class _Leaves:
    """A tree's tensors in the order of their key paths (so every rank agrees on it, whatever
    dict order optree uses in this process: importing ``torch.utils._cxx_pytree``, as dynamo
    does, switches the "torch" namespace to insertion order for good)."""

    tensors: list[Tensor]
    names: list[str]
    spec: Any  # optree PyTreeSpec
    positions: list[int]  # positions[i]: where tensors[i] sits in the spec's flattening order

    def unflatten(self, values: list[Any]) -> Any:
        """The tree with ``values[i]`` in place of ``tensors[i]``."""
        leaves: list[Any] = [None] * len(values)
        for i, v in zip(self.positions, values):
            leaves[i] = v
        return optree.tree_unflatten(self.spec, leaves)


def _flatten(tree: Tree, where: str, argname: str) -> _Leaves:
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace="torch")
    names = [_path(p) for p in paths]
    dtensor = _dtensor_type()
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{where}: {argname}['{name}'] is a {type(leaf).__name__}, not a Tensor; every leaf must be a tensor")
        if dtensor is not None and isinstance(leaf, dtensor):
            raise TypeError(
                f"{where}: {argname}['{name}'] is a DTensor; reduce sharded tensors with their own placements "
                "(redistribute / FSDP2), not by packing their local shards"
            )
        if leaf.layout != torch.strided:
            raise TypeError(f"{where}: {argname}['{name}'] has layout {leaf.layout}; only dense (strided) tensors are supported")
        if leaf.device.type == "meta":
            raise ValueError(f"{where}: {argname}['{name}'] is on the meta device and has no values to communicate")
    order = sorted(range(len(names)), key=names.__getitem__)
    return _Leaves([leaves[i] for i in order], [names[i] for i in order], spec, order)


def _dtensor_type() -> Optional[type]:
    try:  # public since torch 2.5; torch 2.4 has it under torch.distributed._tensor
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _check_devices(leaves: _Leaves, g: _Group, where: str, argname: str) -> None:
    if g.device_types is None:
        return
    for name, t in zip(leaves.names, leaves.tensors):
        if t.device.type not in g.device_types:
            backend = dist.get_backend(g.pg)
            raise ValueError(
                f"{where}: {argname}['{name}'] is on {t.device}, which the '{backend}' backend of the process "
                f"group cannot move (it handles {sorted(g.device_types)}); move the tree first, e.g. "
                "pf.tree.to(tree, device)"
            )


def _signature(leaves: _Leaves) -> list[tuple[str, tuple[int, ...], str, str]]:
    return [(n, tuple(t.shape), str(t.dtype).replace("torch.", ""), t.device.type) for n, t in zip(leaves.names, leaves.tensors)]


def _digest(obj: Any) -> int:
    """A 63-bit hash of ``repr(obj)``, identical in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") >> 1


def _all_gather_rows(row: Tensor, g: _Group, where: str, what: str) -> list[Tensor]:
    row = row.to(g.gather_device(where))
    out = [torch.empty_like(row) for _ in range(g.size)]
    _run(where, what, g, dist.all_gather, out, row, group=g.pg)
    return [t.cpu() for t in out]


def _structure(leaves: _Leaves, g: _Group, where: str, argname: str, plan: Any = None) -> bool:
    """Raise ValueError on every rank unless every rank has the same keys, shapes, dtypes and
    device types. With ``plan``, also compare it: ``True`` when every rank has the same plan."""
    signature = _signature(leaves)
    mine = torch.tensor([_digest(signature), _digest(plan)], dtype=torch.int64)
    rows = _all_gather_rows(mine, g, where, "the structure check (an all-gather)")
    if len({int(r[0]) for r in rows}) != 1:
        everyone: list[Any] = [None] * g.size
        _run(where, "the structure check (an all-gather)", g, dist.all_gather_object, everyone, signature, group=g.pg)
        raise ValueError(f"{where}: {argname} differs across ranks: {_first_difference(everyone)}")
    return len({int(r[1]) for r in rows}) == 1


def _first_difference(signatures: list[Any]) -> str:
    sig0 = signatures[0]
    entries0 = {name: rest for name, *rest in sig0}
    for rank, sig in enumerate(signatures[1:], start=1):
        entries = {name: rest for name, *rest in sig}
        for name, *rest in sig0:
            if name not in entries:
                return f"key '{name}' is on rank 0 but not on rank {rank}"
            if entries[name] != rest:
                (s0, d0, v0), (s1, d1, v1) = rest, entries[name]
                return f"key '{name}' is {_describe(s0, d0, v0)} on rank 0 but {_describe(s1, d1, v1)} on rank {rank}"
        for name, *_ in sig:
            if name not in entries0:
                return f"key '{name}' is on rank {rank} but not on rank 0"
    return "the structure signatures differ"  # unreachable


def _describe(shape: tuple[int, ...], dtype: str, device: str) -> str:
    return f"{tuple(shape)} {dtype} on {device}"


# ---------------------------------------------------------------------- buckets
@dataclass
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    members: list[int]  # leaf indices, in bucket order
    numels: list[int]
    nbytes: int

    @property
    def numel(self) -> int:
        return sum(self.numels)


def _cap_bytes(bucket_cap_mb: Any, where: str) -> int:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(f"{where}: bucket_cap_mb must be a number of MB, got {type(bucket_cap_mb).__name__}")
    if not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0:
        raise ValueError(f"{where}: bucket_cap_mb must be positive and finite, got {bucket_cap_mb}")
    return max(1, int(bucket_cap_mb * _MB))


def _plan(items: Sequence[tuple[torch.device, torch.dtype, int, int]], order: Sequence[int], cap: int) -> list[_Bucket]:
    """Buckets of at most ``cap`` bytes over ``items`` = ``(device, dtype, numel, element size)``
    (one item larger than ``cap`` gets a bucket of its own), one stream per (device, dtype),
    filled in ``order``. Buckets are listed by when their last member comes in ``order``: the
    order they complete, so the launch order, when leaves arrive in ``order``."""
    open_: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
    buckets: list[_Bucket] = []
    rank_in_order = {i: r for r, i in enumerate(order)}
    for i in order:
        device, dtype, numel, itemsize = items[i]
        size = numel * itemsize
        b = open_.get((device, dtype))
        if b is not None and b.nbytes + size > cap:
            buckets.append(b)
            b = None
        if b is None:
            b = open_[(device, dtype)] = _Bucket(device, dtype, [], [], 0)
        b.members.append(i)
        b.numels.append(numel)
        b.nbytes += size
    buckets.extend(open_.values())
    return sorted(buckets, key=lambda b: rank_in_order[b.members[-1]])


def _items(tensors: Sequence[Tensor]) -> list[tuple[torch.device, torch.dtype, int, int]]:
    return [(t.device, t.dtype, t.numel(), t.element_size()) for t in tensors]


def bucket_plan(tree: Tree, *, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> list[list[str]]:
    """The keys of each bucket :func:`all_reduce` would send, in launch order (no communication).

    Buckets are filled in the order of the tensors' key paths (a dict's keys sorted), one
    stream per (device, dtype), closing a bucket when the next tensor would overflow the cap,
    and go in the order they complete (by their last key):

    >>> import torch
    >>> bucket_plan({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float64), "c": torch.zeros(1)})
    [['b'], ['a', 'c']]
    """
    where = "pfunc.distributed.bucket_plan"
    leaves = _flatten(tree, where, "tree")
    buckets = _plan(_items(leaves.tensors), range(len(leaves.tensors)), _cap_bytes(bucket_cap_mb, where))
    return [[leaves.names[i] for i in b.members] for b in buckets]


# ---------------------------------------------------------------------- all-reduce
def _check_op(op: Any, leaves: _Leaves, where: str, argname: str) -> None:
    if op not in ("mean", "sum"):
        raise ValueError(f"{where}: op must be 'mean' or 'sum', got {op!r}")
    for name, t in zip(leaves.names, leaves.tensors):
        if t.dtype == torch.bool:
            raise TypeError(f"{where}: {argname}['{name}'] is bool; it cannot be summed or averaged")
        if op == "mean" and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{where}: {argname}['{name}'] is {t.dtype}; op='mean' needs floating or complex tensors (use op='sum')")


class Pending:
    """Bucket all-reduces in flight; :meth:`wait` gives the reduced tree (the same tree on every call)."""

    def __init__(self, where: str, g: _Group, leaves: _Leaves, buckets: list[_Bucket], op: Op):
        self._where = where
        self._g = g
        self._leaves = leaves
        self._buckets = buckets
        self._op = op
        self._flats: list[Optional[Tensor]] = [None] * len(buckets)
        self._works: list[Any] = [None] * len(buckets)
        self._launched = 0
        self._result: Optional[Tree] = None

    @property
    def buckets(self) -> int:
        """How many collectives (one per bucket) this reduction runs."""
        return len(self._buckets)

    @property
    def bucket_keys(self) -> list[list[str]]:
        """The keys in each bucket, in launch order."""
        return [[self._leaves.names[i] for i in b.members] for b in self._buckets]

    @property
    def launched(self) -> int:
        """How many of the bucket all-reduces have started so far (in order: 0..launched-1)."""
        return self._launched

    def _launch(self, k: int) -> None:
        b, flat = self._buckets[k], self._flats[k]
        assert flat is not None and k == self._launched
        if self._op == "mean" and self._g.size > 1:
            flat.div_(self._g.size)  # before the sum, as DDP does: no overflow in half precision
        what = f"the all-reduce of bucket {k + 1} of {len(self._buckets)} ({b.dtype} on {b.device}, {b.nbytes / _MB:.2f} MB)"
        self._works[k] = _run(self._where, what, self._g, dist.all_reduce, flat, op=dist.ReduceOp.SUM, group=self._g.pg, async_op=True)
        self._launched += 1

    def _pack(self, k: int) -> None:
        b = self._buckets[k]
        self._flats[k] = torch.cat([self._leaves.tensors[i].detach().reshape(-1) for i in b.members])

    def _finish_launches(self) -> None:
        """Hook of the backward route: buckets not launched yet go now."""

    def wait(self) -> Tree:
        """Block until every bucket is reduced (on CUDA: until the current stream is ordered after
        them) and return the reduced tree; its tensors may be views of one bucket each."""
        if self._result is not None:
            return self._result
        self._finish_launches()
        out: list[Optional[Tensor]] = [None] * len(self._leaves.tensors)
        for k, (b, work) in enumerate(zip(self._buckets, self._works)):
            what = f"the all-reduce of bucket {k + 1} of {len(self._buckets)} ({b.dtype} on {b.device}, {b.nbytes / _MB:.2f} MB)"
            _run(self._where, what, self._g, work.wait)
            flat = self._flats[k]
            assert flat is not None
            for i, piece in zip(b.members, flat.split(b.numels)):
                out[i] = piece.view(self._leaves.tensors[i].shape)
        self._result = self._leaves.unflatten(out)
        self._flats = [None] * len(self._buckets)
        self._works = [None] * len(self._buckets)
        return self._result


def all_reduce(
    tree: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    async_op: bool = False,
    check: bool = True,
) -> Any:
    """The mean (``op="mean"``) or sum over ranks of every tensor of ``tree``, as a new tree.

    The tensors are packed into flat buckets of at most ``bucket_cap_mb`` MB per (device,
    dtype) and each bucket is one ``torch.distributed.all_reduce``, launched as soon as it
    is packed, so packing the next bucket overlaps the previous one's communication.
    ``tree``'s tensors are never written; the results are views of the new buckets (shapes
    and dtypes as the inputs', no autograd history). With ``async_op`` the call returns a
    :class:`Pending` at once, and ``pending.wait()`` gives the tree: do other work between.

    ``check`` first all-gathers a 64-bit hash of the keys, shapes, dtypes and devices, and
    raises ``ValueError`` naming the first differing key on every rank when they differ
    (otherwise a mismatch hangs, or reduces garbage). It costs one tiny all-gather (and a
    host sync on CUDA); pass ``check=False`` in a hot loop whose structure cannot change.

    Args:
        tree: a pytree (e.g. ``dict[str, Tensor]``) of dense tensors; ``None`` leaves pass through.
        op: ``"mean"`` (floating and complex tensors) or ``"sum"``.
        group: the process group (default: the world).
        bucket_cap_mb: the bucket size limit (DDP's default 25).
        async_op: return a :class:`Pending` instead of the tree.
        check: verify the structure across ranks first.
    """
    where = "pfunc.distributed.all_reduce"
    g = _group(group, where)
    leaves = _flatten(tree, where, "tree")
    _check_op(op, leaves, where, "tree")
    _check_devices(leaves, g, where, "tree")
    cap = _cap_bytes(bucket_cap_mb, where)
    if check:
        _structure(leaves, g, where, "tree")
    pending = Pending(where, g, leaves, _plan(_items(leaves.tensors), range(len(leaves.tensors)), cap), op)
    for k in range(pending.buckets):
        pending._pack(k)
        pending._launch(k)
    return pending if async_op else pending.wait()


# ---------------------------------------------------------------------- all-reduce during the backward
def _arrival_order(output: Tensor, tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """``(order, unreachable)``: the inputs whose gradient the backward of ``output`` computes, in
    the order autograd's engine produces them, and the inputs it never reaches.

    The engine runs a node once every consumer of its output has run, the highest sequence
    number first (nodes made later in the forward run earlier; a leaf's AccumulateGrad runs as
    soon as it is ready), so the walk replays that schedule: a leaf's gradient is final when
    its AccumulateGrad node would run, a non-leaf input's when its ``grad_fn`` would. The
    order only decides how buckets are filled; correctness never depends on it."""
    by_node: dict[int, list[int]] = {}
    leaf_of: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.grad_fn is not None:
            by_node.setdefault(id(t.grad_fn), []).append(i)
        else:
            leaf_of.setdefault(id(t), []).append(i)
    root = output.grad_fn
    if root is None:  # the output is itself a leaf input
        order = leaf_of.get(id(output), [])
        return order, [i for i in range(len(tensors)) if i not in set(order)]
    deps: dict[int, int] = {}
    nodes = {id(root): root}
    stack = [root]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is None:
                continue
            deps[id(nxt)] = deps.get(id(nxt), 0) + 1
            if id(nxt) not in nodes:
                nodes[id(nxt)] = nxt
                stack.append(nxt)
    order: list[int] = []
    ready = [(-_sequence_nr(root), 0, root)]
    count = 1
    while ready:
        _, _, node = heapq.heappop(ready)
        order.extend(by_node.get(id(node), ()))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            order.extend(leaf_of.get(id(variable), ()))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            deps[id(nxt)] -= 1
            if deps[id(nxt)] == 0:
                heapq.heappush(ready, (-_sequence_nr(nxt), count, nxt))
                count += 1
    reached = set(order)
    return order, [i for i in range(len(tensors)) if i not in reached]


def _sequence_nr(node: Any) -> int:
    get = getattr(node, "_sequence_nr", None)
    return get() if get is not None else 0


class _BackwardPending(Pending):
    """Buckets filled by tensor hooks during a backward; each is launched when complete, in order
    (with ``overlap=False`` only at :meth:`wait`, after the backward)."""

    def __init__(self, where: str, g: _Group, leaves: _Leaves, buckets: list[_Bucket], op: Op, overlap: bool):
        super().__init__(where, g, leaves, buckets, op)
        self._overlap = overlap
        self._slot: dict[int, tuple[int, int]] = {}  # leaf -> (bucket, offset)
        for k, b in enumerate(buckets):
            offset = 0
            for i, n in zip(b.members, b.numels):
                self._slot[i] = (k, offset)
                offset += n
        self._missing = [len(b.members) for b in buckets]
        self._arrived = [False] * len(leaves.tensors)
        self._lock = threading.Lock()

    def _buffer(self, k: int) -> Tensor:
        flat = self._flats[k]
        if flat is None:
            b = self._buckets[k]
            flat = self._flats[k] = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        return flat

    def _zero(self, i: int) -> None:
        """Leaf ``i`` gets no gradient from this backward: it counts as zeros (autograd's materialize_grads)."""
        k, offset = self._slot[i]
        self._buffer(k)[offset : offset + self._leaves.tensors[i].numel()].zero_()
        self._arrived[i] = True
        self._missing[k] -= 1

    def _launch_ready(self) -> None:
        while self._launched < len(self._buckets) and self._missing[self._launched] == 0:
            self._launch(self._launched)

    def _on_grad(self, i: int, grad: Tensor) -> None:
        name = self._leaves.names[i]
        if grad.layout != torch.strided:
            raise TypeError(f"{self._where}: the gradient of '{name}' is {grad.layout}; only dense gradients are supported")
        with self._lock:
            if self._arrived[i] or self._result is not None:
                raise RuntimeError(
                    f"{self._where}: a second gradient of '{name}' arrived in one block; run one backward "
                    "per all_reduce_in_backward (sum micro-batch gradients before the last one)"
                )
            k, offset = self._slot[i]
            self._buffer(k)[offset : offset + grad.numel()].copy_(grad.detach().reshape(-1))
            self._arrived[i] = True
            self._missing[k] -= 1
            if self._overlap:
                self._launch_ready()

    def _finish_launches(self) -> None:
        with self._lock:
            for i, arrived in enumerate(self._arrived):
                if not arrived:  # reachable, but the backward produced no gradient for it
                    self._zero(i)
            self._launch_ready()


@contextlib.contextmanager
def all_reduce_in_backward(
    output: Tensor,
    inputs: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Iterator[Pending]:
    """Within the block, the one backward of ``output`` all-reduces its gradients w.r.t. ``inputs``
    bucket by bucket, each bucket's all-reduce starting the moment its last gradient is ready.

    On entry the autograd graph of ``output`` is walked to predict the order in which the
    engine will produce the gradients, and the buckets are filled in that order, so the first
    bucket (the last layers') goes on the wire while autograd still computes the first layers'
    gradients. Inputs the graph does not reach count as zeros from the start. A hook on every
    input tensor copies its gradient into its bucket; buckets launch in order, the same on every
    rank. The hooks are removed when the block exits; ``pending.wait()`` (after the backward)
    launches what is left and gives the reduced tree.

    ``check`` all-gathers, with the structure's hash, a hash of the predicted order: if the
    ranks' graphs differ (data-dependent control flow) every rank falls back to filling buckets
    in ``inputs``' order and launching them after the backward, which is always safe. Only with
    ``check=False`` must the graph be the same on every rank.

    One top-level ``torch.autograd.grad`` or ``.backward()`` of ``output`` per block; not inside
    ``torch.func`` transforms (their gradients fire no tensor hooks).

    >>> # leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    >>> # loss, state = loss_fn(leaves, state, x)
    >>> # with pf.distributed.all_reduce_in_backward(loss, leaves) as pending:
    >>> #     loss.backward()                       # or torch.autograd.grad(loss, ...)
    >>> # grads = pending.wait()                    # the mean over ranks
    """
    where = "pfunc.distributed.all_reduce_in_backward"
    _check_output(output, where)
    g = _group(group, where)
    leaves = _flatten(inputs, where, "inputs")
    for name, t in zip(leaves.names, leaves.tensors):
        if not t.requires_grad:
            raise ValueError(f"{where}: inputs['{name}'] does not require grad, so no gradient would ever reach it")
    _check_op(op, leaves, where, "inputs")
    _check_devices(leaves, g, where, "inputs")
    cap = _cap_bytes(bucket_cap_mb, where)
    order, unreachable = _arrival_order(output, leaves.tensors)
    overlap = True
    if check:
        overlap = _structure(leaves, g, where, "inputs", plan=(order, unreachable))
    if not overlap:
        order, unreachable = list(range(len(leaves.tensors))), []
    pending = _BackwardPending(where, g, leaves, _plan(_items(leaves.tensors), order + unreachable, cap), op, overlap)
    for i in unreachable:
        pending._zero(i)
    handles = []
    try:
        for i, t in enumerate(leaves.tensors):
            if i not in unreachable:
                handles.append(t.register_hook(_Hook(pending, i)))
        yield pending
    finally:
        for h in handles:
            h.remove()


class _Hook:
    """A tensor hook that hands the gradient of input ``i`` to its bucket and leaves it unchanged."""

    __slots__ = ("pending", "i")

    def __init__(self, pending: _BackwardPending, i: int):
        self.pending, self.i = pending, i

    def __call__(self, grad: Tensor) -> None:
        self.pending._on_grad(self.i, grad)


def _check_output(output: Any, where: str) -> None:
    if not isinstance(output, Tensor) or output.numel() != 1:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"{where}: output must be a one-element tensor (the loss), got {shape}")
    if not output.requires_grad:
        raise ValueError(f"{where}: output does not require grad; it was computed without autograd history")


def all_reduce_grad(
    output: Tensor,
    inputs: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Tree:
    """The gradient of scalar ``output`` w.r.t. the tree ``inputs``, averaged (or summed) over
    ranks, each bucket's all-reduce overlapping the rest of the backward.

    ``torch.autograd.grad(output, inputs)`` inside :func:`all_reduce_in_backward`; inputs the
    output does not depend on get zeros. Use it at the top level, on leaves made for the step:

    >>> # leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    >>> # loss, state = loss_fn(leaves, state, x)
    >>> # grads = pf.distributed.all_reduce_grad(loss, leaves)   # == all_reduce(local grads)

    Args:
        output: a one-element tensor (the local loss).
        inputs: a tree of tensors that require grad.
        op, group, bucket_cap_mb: as for :func:`all_reduce`.
        check: as for :func:`all_reduce_in_backward`.
    """
    where = "pfunc.distributed.all_reduce_grad"
    _check_output(output, where)
    with all_reduce_in_backward(output, inputs, op=op, group=group, bucket_cap_mb=bucket_cap_mb, check=check) as pending:
        tensors = optree.tree_leaves(inputs, namespace="torch")
        torch.autograd.grad(output, tensors, allow_unused=True)
    return pending.wait()


# ---------------------------------------------------------------------- broadcast
def _bytes_of(t: Tensor) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.contiguous().view(torch.uint8)


_ALIGN = 16  # every tensor starts 16-byte aligned in a byte bucket, so any dtype views back


def broadcast(
    tree: Tree,
    *,
    src: int = 0,
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Tree:
    """Rank ``src``'s tree on every rank, as new tensors (``tree`` itself is never written).

    Bitwise: every leaf's bytes travel in byte buckets of at most ``bucket_cap_mb`` MB per
    device, whatever its dtype. Each output has its own storage and keeps its input's
    ``requires_grad`` (so broadcast params stay leaves for ``torch.optim``). Use it for the
    initial ``params`` and ``state`` and, by DDP's rule, for module buffers. ``check`` (on by
    default; this is a start-of-run call) first verifies that every rank's tree has the same
    keys, shapes and dtypes, since the other ranks' tensors are the receive buffers' template.

    Args:
        tree: a pytree of dense tensors.
        src: the rank (within ``group``) whose values everyone gets.
        group, bucket_cap_mb, check: as for :func:`all_reduce`.
    """
    where = "pfunc.distributed.broadcast"
    g = _group(group, where)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < g.size:
        raise ValueError(f"{where}: src must be a rank in [0, {g.size}), got {src!r}")
    leaves = _flatten(tree, where, "tree")
    _check_devices(leaves, g, where, "tree")
    cap = _cap_bytes(bucket_cap_mb, where)
    if check:
        _structure(leaves, g, where, "tree")
    global_src = src if g.pg is None else dist.get_global_rank(g.pg, src)
    tensors = leaves.tensors
    # every leaf as padded bytes: one stream of byte buckets per device, whatever the dtypes
    items = [(t.device, torch.uint8, _padded(t.numel() * t.element_size()), 1) for t in tensors]
    out: list[Optional[Tensor]] = [None] * len(tensors)
    for k, b in enumerate(_plan(items, range(len(tensors)), cap)):
        if g.rank == src:
            flat = torch.zeros(b.numel, dtype=torch.uint8, device=b.device)
            offset = 0
            for i, n in zip(b.members, b.numels):
                raw = _bytes_of(tensors[i])
                flat[offset : offset + raw.numel()].copy_(raw)
                offset += n
        else:
            flat = torch.empty(b.numel, dtype=torch.uint8, device=b.device)
        what = f"the broadcast of bucket {k + 1} ({b.nbytes / _MB:.2f} MB on {b.device})"
        _run(where, what, g, dist.broadcast, flat, global_src, group=g.pg)
        offset = 0
        for i, n in zip(b.members, b.numels):
            t = tensors[i]
            size = t.numel() * t.element_size()
            value = flat[offset : offset + size].clone()
            value = (value.view(torch.bool) if t.dtype == torch.bool else value.view(t.dtype)).view(t.shape)
            out[i] = value.requires_grad_(t.requires_grad)
            offset += n
    return leaves.unflatten(out)


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


# ---------------------------------------------------------------------- checks
def check_same_structure(tree: Tree, *, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks' trees have the same keys, shapes,
    dtypes and device types (the first difference is named). One tiny all-gather."""
    where = "pfunc.distributed.check_same_structure"
    g = _group(group, where)
    _structure(_flatten(tree, where, "tree"), g, where, "tree")


_PRIME = 2**31 - 1
_ROW = 64


def _fingerprint(t: Tensor) -> Tensor:
    """Four int64 numbers computed from ``t``'s bytes, where ``t`` lives: bitwise-equal tensors
    agree; changing any element, or swapping two unequal ones, changes them.

    The bytes are read as int32 words (no copy for a contiguous tensor whose size allows it)
    laid out as rows of 64. Integer addition wraps, so the column and row sums (int32, mod
    2**32) come out the same in any summation order and run at memory speed; the 64 column
    sums and the row sums are then combined exactly in int64, weighted by position mod
    2**31 - 1. Result: the sum, the column-weighted sum, the row-weighted sum, the word count."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    if size >= 4 or ((flat.numel() * size) % 4 == 0 and (flat.storage_offset() * size) % 4 == 0):
        words = flat.view(torch.int32)
    else:  # odd-sized half / byte tensors: widen each element (a copy)
        words = flat.view(torch.int16 if size == 2 else torch.uint8).to(torch.int32)
    n = words.numel()
    m = n // _ROW
    body, tail = words[: m * _ROW].view(m, _ROW), words[m * _ROW :].to(torch.int64)
    col_w = torch.arange(1, _ROW + 1, device=words.device, dtype=torch.int64)
    row_w = torch.arange(1, m + 1, device=words.device, dtype=torch.int64) % _PRIME
    cols = body.sum(0, dtype=torch.int32).to(torch.int64)
    rows = body.sum(1, dtype=torch.int32).to(torch.int64)
    total = cols.sum() + tail.sum()
    by_col = ((cols % _PRIME) * col_w).sum() + ((tail % _PRIME) * col_w[: tail.numel()]).sum()
    by_row = (((rows % _PRIME) * row_w) % _PRIME).sum() + (tail.sum() % _PRIME) * (m + 1)
    return torch.stack([total, by_col, by_row, torch.tensor(n, device=words.device)])


def check_identical(tree: Tree, *, group: Optional[dist.ProcessGroup] = None, what: str = "tree") -> None:
    """Raise ``ValueError`` on every rank unless every rank holds a bitwise-identical ``tree``.

    The structure is checked first; then each tensor's fingerprint (four int64 sums of its
    bytes, computed where the tensor lives) is all-gathered, and the error names the first
    key whose fingerprint differs and the ranks that disagree with rank 0. Costs one pass
    over the values and two small all-gathers: cheap next to a broadcast, so use it at start
    and after resume, or every N steps to catch silent divergence. ``what`` names the tree
    in the message (``"params"``).
    """
    where = "pfunc.distributed.check_identical"
    g = _group(group, where)
    leaves = _flatten(tree, where, what)
    _structure(leaves, g, where, what)
    if not leaves.tensors:
        return
    mine = torch.stack([_fingerprint(t).cpu() for t in leaves.tensors])
    rows = _all_gather_rows(mine, g, where, "the fingerprint all-gather")
    for i, name in enumerate(leaves.names):
        differing = [r for r in range(1, g.size) if not torch.equal(rows[r][i], rows[0][i])]
        if differing:
            n_bad = sum(any(not torch.equal(rows[r][j], rows[0][j]) for r in range(g.size)) for j in range(len(leaves.names)))
            ranks = ", ".join(str(r) for r in differing)
            raise ValueError(
                f"{where}: {what}['{name}'] differs between rank 0 and rank {ranks} "
                f"({n_bad} of {len(leaves.names)} tensors differ; broadcast from rank 0 to make them agree)"
            )
