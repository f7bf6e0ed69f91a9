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
* :func:`bucket_plan`: which keys travel together, without communicating.

Every function is collective: every rank of ``group`` calls it, in the same order.
Structure is checked before the payload (``check=True``), so mismatched keys or
shapes are a :class:`ValueError` on every rank rather than a hang; a peer that dies
or stalls past the process group's timeout (``init_process_group(timeout=...)``)
is a :class:`CollectiveError`.

One idea per module: ``process_group`` (the group, :class:`CollectiveError`), ``trees`` (the
order every rank agrees on, the structure check), ``buckets``, ``reduction`` (:func:`all_reduce`),
``backward_overlap`` (:func:`all_reduce_in_backward`, :func:`all_reduce_grad`), ``broadcasting``
(:func:`broadcast`), ``checks`` (:func:`check_identical`, :func:`check_same_structure`).

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

from .backward_overlap import all_reduce_grad, all_reduce_in_backward
from .broadcasting import broadcast
from .buckets import DEFAULT_BUCKET_CAP_MB, bucket_plan
from .checks import check_identical, check_same_structure
from .process_group import CollectiveError
from .reduction import Pending, all_reduce

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
