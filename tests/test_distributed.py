"""``pfunc.distributed`` on real processes: 2 gloo ranks over a file store, each running
``tests/distributed_worker.py``; the assertions here read what every rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pfunc as pf

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def launch(folder: Path, scenarios: list[str], *, timeout_s: float = 30.0, deadline_s: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Run ``WORLD`` worker ranks (a gloo group whose collectives time out after ``timeout_s``);
    kill them all if they outlive ``deadline_s`` (a hang is a failure, not a stuck suite)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD), str(folder / "store"), str(folder), str(timeout_s), *scenarios],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    done = []
    end = time.monotonic() + deadline_s
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(p.communicate()[0] or "" for p in procs)
        pytest.fail(f"the ranks were still running after {deadline_s} s (a hang):\n{logs[-4000:]}")
    return done


def results(folder: Path, scenario: str) -> list[dict]:
    return [torch.load(folder / f"{scenario}.{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-rank launch running every scenario that leaves the group healthy."""
    folder = tmp_path_factory.mktemp("distributed")
    procs = launch(folder, ["mean", "async", "backward", "broadcast", "identical", "structure", "bad_input"])
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    return folder


def tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
        torch.float16: dict(rtol=1e-3, atol=1e-3),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
    }.get(dtype, dict(rtol=1e-6, atol=1e-6))


# ---------------------------------------------------------------------- all_reduce
def test_all_reduce_gives_the_mean_of_every_ranks_tensors_in_every_dtype(run):
    ranks = results(run, "mean")
    inputs = [r["input"] for r in ranks]
    for key, got in ranks[0]["mean"].items():
        if got is None:
            continue
        want = sum(i[key].to(torch.complex128 if got.is_complex() else torch.float64) for i in inputs) / WORLD
        assert got.dtype == inputs[0][key].dtype and got.shape == inputs[0][key].shape, key
        assert torch.allclose(got.to(want.dtype), want, **tolerance(got.dtype)), key
        assert torch.equal(got, ranks[1]["mean"][key]), f"{key}: ranks disagree"


def test_all_reduce_packs_many_small_tensors_into_a_few_buckets_per_dtype(run):
    rank0 = results(run, "mean")[0]
    plan = rank0["plan"]
    n_tensors = sum(v is not None for v in rank0["input"].values())
    assert rank0["buckets"] == len(plan)
    assert 8 <= len(plan) < n_tensors // 3  # several buckets, far fewer collectives than tensors
    for bucket in plan:  # one dtype per bucket
        assert len({rank0["input"][k].dtype for k in bucket}) == 1, bucket
    assert sorted(k for b in plan for k in b) == sorted(k for k, v in rank0["input"].items() if v is not None)


def test_all_reduce_sums_integers_exactly(run):
    ranks = results(run, "mean")
    for key in ranks[0]["ints"]:
        want = sum(r["ints"][key] for r in ranks)
        for r in ranks:
            assert torch.equal(r["sum_ints"][key], want)


def test_all_reduce_never_writes_its_inputs_and_returns_new_storage(run):
    for r in results(run, "mean"):
        assert r["inputs_unchanged"]
        assert not r["storage_shared_with_input"]
        assert r["none_kept"]


def test_async_all_reduce_equals_the_synchronous_one(run):
    for r in results(run, "async"):
        assert r["launched_at_return"] == r["buckets"] > 1  # every bucket on the wire before the caller's work
        assert r["same_tree_twice"]
        for key, want in r["sync"].items():
            assert (want is None and r["async"][key] is None) or torch.equal(r["async"][key], want), key


# ---------------------------------------------------------------------- the backward route
def test_all_reduce_during_backward_equals_autograd_or_pf_grad_then_all_reduce(run):
    ranks = results(run, "backward")
    for r in ranks:
        for key, want in r["reference"].items():
            assert torch.equal(r["overlapped"][key], want), key
            assert torch.equal(r["in_context"][key], want), key
            assert torch.allclose(r["via_pf_grad"][key], want, rtol=0, atol=1e-7), key
        assert not r["hooks_left"]
        assert torch.equal(r["overlapped"]["unused"], torch.zeros(3))
    for key, got in ranks[0]["reference"].items():  # and the reference is the mean of the local gradients
        assert torch.allclose(got, sum(r["local"][key] for r in ranks) / WORLD, atol=1e-7), key


def test_buckets_go_on_the_wire_while_the_backward_still_runs(run):
    r = results(run, "backward")[0]
    plan = r["plan"]  # launch order, predicted from the graph: last layers first
    assert plan[0][:2] == ["6.bias", "6.weight"]
    last = next(k for k, b in enumerate(plan) if "2.parametrizations.weight.original" in b)
    assert last >= 2
    assert r["launched_before_last_grad"] == last  # every earlier bucket had started before its gradient came


def test_backward_route_falls_back_safely_when_the_ranks_graphs_differ(run):
    for r in results(run, "backward"):
        assert r["branch_launched_in_backward"] == 0  # the plans differed: launched after the backward
        for key, want in r["branch_reference"].items():
            assert torch.equal(r["branch"][key], want), key


def test_a_second_backward_in_one_block_is_a_clear_error(run):
    for r in results(run, "backward"):
        assert r["twice_error"].startswith("RuntimeError: pfunc.distributed.all_reduce_in_backward: a second gradient of '6.bias'")


# ---------------------------------------------------------------------- broadcast and checks
def test_broadcast_gives_every_rank_the_source_ranks_tree_bitwise(run):
    ranks = results(run, "broadcast")
    for src, key in ((0, "from_0"), (1, "from_1")):
        want = flat(ranks[src]["input"])
        for r in ranks:
            got = flat(r[key])
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
                assert torch.equal(got[k], want[k]), k
    for r in ranks:
        assert r["requires_grad"] == {"w": True, "half": False, "mask": False, "steps": False, "scalar": False, "complex": False, "bytes": False}
        assert r["is_leaf"] and r["inputs_unchanged"] and r["own_storage"]
    assert not torch.equal(ranks[0]["input"]["w"], ranks[1]["input"]["w"])  # the ranks did start different


def flat(tree) -> dict:
    """``{"a.b": tensor}`` for a nested tree."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace="torch")
    return {".".join(map(str, p)): leaf for p, leaf in zip(paths, leaves)}


def test_check_identical_names_the_first_differing_key_on_every_rank(run):
    for r in results(run, "identical"):
        assert r["ok"] == "no error" and r["fixed"] == "no error"
        assert r["one_ulp"] == (
            "ValueError: pfunc.distributed.check_identical: params['layer.3.weight'] differs between rank 0 and rank 1 "
            "(2 of 6 tensors differ; broadcast from rank 0 to make them agree)"
        )
        assert "tree['z'] differs" in r["signed_zero"]  # bitwise: -0.0 is not 0.0
        assert "tree['w'] differs" in r["order"]  # same sum, other order


def test_mismatched_trees_are_an_error_on_every_rank_not_a_hang(run):
    for r in results(run, "structure"):
        assert r["extra_key"] == "ValueError: pfunc.distributed.all_reduce: tree differs across ranks: key 'c' is on rank 1 but not on rank 0"
        assert r["shape"].endswith("key 'b' is (2, 2) float32 on cpu on rank 0 but (2, 3) float32 on cpu on rank 1")
        assert r["dtype"].startswith("ValueError: pfunc.distributed.broadcast:") and "(3,) float64 on cpu on rank 1" in r["dtype"]
        assert "check_same_structure" in r["check_same_structure"] and "'c'" in r["check_same_structure"]
        assert r["same"] == "no error"
        assert torch.equal(r["after"], torch.tensor([0.5]))  # the group stayed in step


@pytest.mark.parametrize(
    "case, expected",
    [
        ("non_tensor", "TypeError: pfunc.distributed.all_reduce: tree['lr'] is a float, not a Tensor"),
        ("mean_of_ints", "TypeError: pfunc.distributed.all_reduce: tree['n'] is torch.int64; op='mean' needs floating"),
        ("bool", "TypeError: pfunc.distributed.all_reduce: tree['m'] is bool"),
        ("op", "ValueError: pfunc.distributed.all_reduce: op must be 'mean' or 'sum', got 'max'"),
        ("cap", "ValueError: pfunc.distributed.all_reduce: bucket_cap_mb must be positive and finite, got 0"),
        ("cap_nan", "ValueError: pfunc.distributed.all_reduce: bucket_cap_mb must be positive and finite, got nan"),
        ("src", "ValueError: pfunc.distributed.broadcast: src must be a rank in [0, 2), got 2"),
        ("meta", "ValueError: pfunc.distributed.all_reduce: tree['w'] is on the meta device"),
        ("sparse", "TypeError: pfunc.distributed.all_reduce: tree['s'] has layout torch.sparse_coo"),
        ("group", "TypeError: pfunc.distributed.all_reduce: group must be a torch.distributed.ProcessGroup or None, got str"),
        ("no_grad", "ValueError: pfunc.distributed.all_reduce_grad: output does not require grad"),
        ("input_no_grad", "ValueError: pfunc.distributed.all_reduce_in_backward: inputs['w'] does not require grad"),
        ("output_not_scalar", "ValueError: pfunc.distributed.all_reduce_grad: output must be a one-element tensor (the loss), got (2,)"),
        ("device", "ValueError: pfunc.distributed.all_reduce: tree['w'] is on cpu, which the 'cuda:gloo' backend"),
        ("device_broadcast", "ValueError: pfunc.distributed.broadcast: tree['w'] is on cpu, which the 'cuda:gloo' backend"),
    ],
)
def test_bad_input_is_a_clear_error_naming_the_argument(run, case, expected):
    for r in results(run, "bad_input"):
        assert r[case].startswith(expected), r[case]
        assert torch.equal(r["after"], torch.tensor([0.5]))


# ---------------------------------------------------------------------- failures
def test_a_stalled_peer_makes_the_collective_fail_within_the_timeout(tmp_path):
    timeout = 2.0
    procs = launch(tmp_path, ["stall"], timeout_s=timeout, deadline_s=90)
    assert procs[0].returncode == 0, procs[0].stdout[-3000:]
    r = torch.load(tmp_path / "stall.0.pt", weights_only=False)
    assert r["error"].startswith("CollectiveError: pfunc.distributed.all_reduce:"), r["error"]
    assert "failed on rank 0 of 2" in r["error"] and "timeout" in r["error"].lower()
    assert timeout * 0.9 <= r["seconds"] <= timeout + 6, r["seconds"]  # gloo honours init_process_group(timeout=)


def test_a_peer_killed_mid_collective_makes_the_other_fail_fast(tmp_path):
    procs = launch(tmp_path, ["killed"], timeout_s=60.0, deadline_s=90)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 0, procs[0].stdout[-3000:]
    r = torch.load(tmp_path / "killed.0.pt", weights_only=False)
    assert r["error"].startswith("CollectiveError: pfunc.distributed.all_reduce:"), r["error"]
    assert r["seconds"] < 20, r["seconds"]  # the closed connection, long before the 60 s timeout


# ---------------------------------------------------------------------- in this process (no group)
def test_no_process_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    for call in (
        lambda: pf.distributed.all_reduce({"w": torch.ones(2)}),
        lambda: pf.distributed.broadcast({"w": torch.ones(2)}),
        lambda: pf.distributed.check_identical({"w": torch.ones(2)}),
        lambda: pf.distributed.all_reduce_grad(torch.ones((), requires_grad=True), {"w": torch.ones(2, requires_grad=True)}),
    ):
        with pytest.raises(RuntimeError, match=r"pfunc\.distributed\.\w+: no process group is initialised; call torch\.distributed\.init_process_group"):
            call()


def test_bucket_plan_keeps_one_dtype_per_bucket_and_a_big_tensor_alone():
    tree = {"a": torch.zeros(100), "big": torch.zeros(1000), "b": torch.zeros(100), "d": torch.zeros(10, dtype=torch.float64), "c": torch.zeros(100)}
    cap_mb = 1000 / 2**20  # 1000 bytes: 250 float32
    # optree flattens a dict in sorted key order: a, b, big, c, d
    assert pf.distributed.bucket_plan(tree, bucket_cap_mb=cap_mb) == [["a", "b"], ["big"], ["c"], ["d"]]
    with pytest.raises(TypeError, match=r"bucket_plan: tree\['x'\] is a str"):
        pf.distributed.bucket_plan({"x": "no"})


@given(
    sizes=st.lists(st.tuples(st.integers(0, 300), st.sampled_from([torch.float32, torch.float64, torch.bfloat16])), max_size=30),
    cap_bytes=st.integers(1, 2000),
)
def test_bucket_plan_covers_every_tensor_once_within_the_cap(sizes, cap_bytes):
    tree = {f"t{i:02d}": torch.zeros(n, dtype=dtype) for i, (n, dtype) in enumerate(sizes)}
    plan = pf.distributed.bucket_plan(tree, bucket_cap_mb=cap_bytes / 2**20)
    assert sorted(k for b in plan for k in b) == sorted(tree)
    for bucket in plan:
        assert len({tree[k].dtype for k in bucket}) == 1
        nbytes = sum(tree[k].numel() * tree[k].element_size() for k in bucket)
        assert nbytes <= cap_bytes or len(bucket) == 1
        assert bucket == sorted(bucket)  # the tree's (sorted-key) order within a bucket


def test_the_module_docstring_example_runs():
    """The example initialises a (1-rank) process group, so it runs in a process of its own."""
    code = "import doctest, sys, pfunc.distributed as m; r = doctest.testmod(m); sys.exit(1 if r.failed or not r.attempted else 0)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
