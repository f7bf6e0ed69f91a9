"""What a training run's checkpoint holds, and the checks it passes before anything starts from it.

:mod:`.checkpoint` makes the file safe (atomic, verified by its SHA-256, no pickled code);
this module makes its *contents* trustworthy. A payload with a valid digest can still be
wrong (written by other code, edited by hand, from another model), and using it would
fail later with a ``KeyError`` mid-run or, worse, train on garbage. So before a run resumes
or samples from it, :func:`check_payload` checks every required key and its type, the config's
values (:func:`~.config.check_values`), the random streams; :func:`check_fits` checks every
tensor's name, shape and dtype against the model the config describes and the optimizer state
against the params. Each problem is a :class:`~.checkpoint.CheckpointError` naming the field.

>>> import torch
>>> from examples.diffusion.config import PRESETS, TrainConfig
>>> try:
...     check_payload({"kind": KIND, "config": TrainConfig(**PRESETS["cpu"]).to_dict(), "step": 7}, "ckpt.pt")
... except CheckpointError as e:
...     print(e)
checkpoint 'ckpt.pt' lacks 'params', 'state', 'ema', 'optimizer', 'rng'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, check_values
from .training import Generators, TrainState, make_optimizer

__all__ = ["KIND", "CHECKPOINT", "checkpoint_path", "make_payload", "check_payload", "check_fits", "restore"]

KIND = "pfunc-diffusion"
CHECKPOINT = "checkpoint.pt"
_ADAM_STATE = ("exp_avg", "exp_avg_sq")


def checkpoint_path(run_or_checkpoint: Union[str, os.PathLike]) -> Path:
    """The checkpoint file of a run folder (``<run>/checkpoint.pt``), or the file itself.

    :class:`CheckpointError` when neither exists, or when a folder stands where the file should be.
    """
    path = Path(run_or_checkpoint)
    if str(run_or_checkpoint) == "":
        raise CheckpointError("no checkpoint given: pass a run folder or its checkpoint.pt (got an empty path)")
    if path.is_dir() and path.suffix == ".pt":
        raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint file")
    if path.is_dir():
        inner = path / CHECKPOINT
        if inner.is_dir():
            raise CheckpointError(f"{str(inner)!r} is a folder, not a checkpoint file")
        if not inner.exists():
            raise CheckpointError(f"{str(path)!r} is a folder without a {CHECKPOINT}: not a training run (or it never reached a checkpoint)")
        return inner
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return path


def make_payload(cfg: TrainConfig, ts: TrainState, gens: Generators) -> dict:
    """The checkpoint of a run at ``ts.step``: config, params, state, EMA, optimizer, random streams (CPU tensors)."""

    def cpu(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in d.items()}

    return {
        "kind": KIND,
        "config": cfg.to_dict(),
        "step": ts.step,
        "params": cpu(ts.params),
        "state": cpu(ts.state),
        "ema": cpu(ts.ema),
        "optimizer": ts.optimizer.state_dict(),
        "rng": gens.state_dict(),
        "torch_version": str(torch.__version__),
    }


def _type_name(v: Any) -> str:
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_dict(payload: dict, key: str, where: str) -> dict[str, Tensor]:
    d = payload[key]
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint {where!r}: {key!r} must be a dict of tensors, got {_type_name(d)}")
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"checkpoint {where!r}: {key}[{k!r}] must be a tensor under a string key, got {_type_name(v)}")
    return d


def _byte_tensor(v: Any, field: str, where: str) -> None:
    if not isinstance(v, Tensor) or v.dtype != torch.uint8 or v.dim() != 1:
        got = f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else _type_name(v)
        raise CheckpointError(f"checkpoint {where!r}: {field} must be a generator state (1-D uint8 tensor), got {got}")


def _check_rng(rng: Any, where: str) -> None:
    if not isinstance(rng, dict):
        raise CheckpointError(f"checkpoint {where!r}: 'rng' must be a dict of random-stream states, got {_type_name(rng)}")
    for key in ("order", "noise", "noise_device", "coin"):
        if key not in rng:
            raise CheckpointError(f"checkpoint {where!r}: 'rng' lacks {key!r}")
    order = rng["order"]
    if not isinstance(order, dict) or not {"generator", "perm", "pos"} <= set(order):
        raise CheckpointError(f"checkpoint {where!r}: rng['order'] must be a dict with 'generator', 'perm' and 'pos'")
    _byte_tensor(order["generator"], "rng['order']['generator']", where)
    perm = order["perm"]
    if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or perm.dim() != 1 or perm.numel() == 0:
        raise CheckpointError(f"checkpoint {where!r}: rng['order']['perm'] must be a non-empty 1-D int64 tensor")
    if not torch.equal(perm.sort().values, torch.arange(perm.numel())):
        raise CheckpointError(f"checkpoint {where!r}: rng['order']['perm'] is not a permutation of 0..{perm.numel() - 1}")
    if not _is_int(order["pos"]) or not 0 <= order["pos"] <= perm.numel():
        raise CheckpointError(f"checkpoint {where!r}: rng['order']['pos'] must be an integer in [0, {perm.numel()}], got {order['pos']!r}")
    _byte_tensor(rng["noise"], "rng['noise']", where)
    _byte_tensor(rng["coin"], "rng['coin']", where)
    if rng["noise_device"] not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"checkpoint {where!r}: rng['noise_device'] must be 'cpu', 'cuda' or 'mps', got {rng['noise_device']!r}")


def check_payload(payload: Any, where: str) -> TrainConfig:
    """The run's config, after checking every required key of ``payload`` and its type.

    ``where`` (the file) goes into every message. Checks: ``kind``; ``config`` a dict whose
    values pass :func:`~.config.check_values`; ``step`` a non-negative integer no larger than
    the config's ``steps``; ``params``, ``state``, ``ema`` dicts of tensors; ``optimizer`` a
    dict with ``state`` and ``param_groups``; ``rng`` the random streams' states.
    """
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {where!r} holds a {_type_name(payload)}, expected a dict")
    if payload.get("kind") != KIND:
        raise CheckpointError(f"checkpoint {where!r} is not a pfunc diffusion training checkpoint (kind {payload.get('kind')!r})")
    missing = [k for k in ("config", "step", "params", "state", "ema", "optimizer", "rng") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {where!r} lacks {', '.join(repr(k) for k in missing)}")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"checkpoint {where!r}: 'config' must be a dict, got {_type_name(payload['config'])}")
    try:
        cfg = TrainConfig.from_dict(payload["config"])
        check_values(cfg)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {where!r}: its config is invalid: {e}") from None
    step = payload["step"]
    if not _is_int(step):
        raise CheckpointError(f"checkpoint {where!r}: 'step' must be an integer, got {_type_name(step)}")
    if not 0 <= step <= cfg.steps:
        raise CheckpointError(f"checkpoint {where!r}: 'step' {step} is outside [0, {cfg.steps}] (the config's steps)")
    for key in ("params", "state", "ema"):
        _tensor_dict(payload, key, where)
    opt = payload["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"checkpoint {where!r}: 'optimizer' must be an optimizer state_dict (a dict with 'state' and 'param_groups')")
    _check_rng(payload["rng"], where)
    if "torch_version" in payload and not isinstance(payload["torch_version"], str):
        raise CheckpointError(f"checkpoint {where!r}: 'torch_version' must be a string, got {_type_name(payload['torch_version'])}")
    return cfg


def _check_tensors(what: str, saved: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str) -> None:
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {where!r}: its {what} do not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    for k, v in expected.items():
        s = saved[k]
        if s.shape != v.shape or s.dtype != v.dtype:
            raise CheckpointError(
                f"checkpoint {where!r}: {what}[{k!r}] is {s.dtype} {tuple(s.shape)}, but this model's is {v.dtype} {tuple(v.shape)}: "
                "the checkpoint does not fit this model"
            )


def _check_optimizer(opt: dict, params: Mapping[str, Tensor], step: int, where: str) -> None:
    names = list(params)
    groups = opt["param_groups"]
    if len(groups) != 1 or not isinstance(groups[0], dict) or groups[0].get("params") != list(range(len(names))):
        raise CheckpointError(
            f"checkpoint {where!r}: optimizer param_groups must be one group over params 0..{len(names) - 1} (this model's {len(names)} tensors)"
        )
    state = opt["state"]
    if state and set(state) != set(range(len(names))):
        raise CheckpointError(f"checkpoint {where!r}: optimizer state covers params {sorted(state)[:5]}..., not this model's 0..{len(names) - 1}")
    for i, name in enumerate(names):
        if i not in state:
            continue
        entry = state[i]
        if not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint {where!r}: optimizer state[{i}] ({name}) must be a dict, got {_type_name(entry)}")
        for key in _ADAM_STATE:
            t = entry.get(key)
            if not isinstance(t, Tensor) or t.shape != params[name].shape or t.dtype != params[name].dtype:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else _type_name(t)
                raise CheckpointError(
                    f"checkpoint {where!r}: optimizer state[{i}][{key!r}] ({name}) is {got}, "
                    f"expected {params[name].dtype} {tuple(params[name].shape)}"
                )
        t = entry.get("step")
        count = t.item() if isinstance(t, Tensor) and t.numel() == 1 else t
        if not isinstance(count, (int, float)) or isinstance(count, bool) or count != step:
            raise CheckpointError(f"checkpoint {where!r}: optimizer state[{i}]['step'] is {count!r}, the checkpoint's step is {step}")
    if not state and step > 0:
        raise CheckpointError(f"checkpoint {where!r}: the optimizer has no state although the run is at step {step}")


def check_fits(payload: dict, net, where: str) -> None:
    """Check ``payload``'s tensors against ``net`` (a :class:`pfunc.Parametrized` Unet): params, EMA
    and state with this model's names, shapes and dtypes; the optimizer state over these params."""
    fresh_params, fresh_state = net.init()
    _check_tensors("params", payload["params"], fresh_params, where)
    _check_tensors("EMA params", payload["ema"], fresh_params, where)
    _check_tensors("state", payload["state"], fresh_state, where)
    # the optimizer walks params in the order make_optimizer gives it: the payload's params order
    ordered = {k: payload["params"][k] for k in payload["params"]}
    _check_optimizer(payload["optimizer"], ordered, payload["step"], where)
    bad = [k for k in ("params", "ema", "state") for v in payload[k].values() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {where!r}: its {bad[0]} hold NaN or infinite values")


def restore(
    payload: dict,
    net,
    cfg: TrainConfig,
    device: torch.device,
    gens: Generators,
    where: str,
    optimizer_factory: Callable[[dict, float, float], torch.optim.Optimizer] = make_optimizer,
) -> TrainState:
    """The :class:`~.training.TrainState` of a checked payload (:func:`check_payload`, :func:`check_fits`) on
    ``device``; ``gens`` get the payload's random streams. :class:`CheckpointError` if torch refuses a state.

    ``optimizer_factory(params, lr, weight_decay)`` makes the optimizer that loads the payload's full
    optimizer state (a ``ZeroRedundancyOptimizer`` keeps its own shard of it)."""
    names = list(payload["params"])
    params = {k: payload["params"][k].to(device).requires_grad_(True) for k in names}
    state = {k: v.to(device) for k, v in payload["state"].items()}
    ema = {k: payload["ema"][k].to(device) for k in names}
    optimizer = optimizer_factory(params, cfg.lr, cfg.weight_decay)
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {where!r}: the optimizer state does not load: {e}") from None
    try:
        gens.load_state_dict(payload["rng"])
    except ValueError as e:  # another data set size or device: the message names the flag
        raise ConfigError(str(e)) from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {where!r}: a random-stream state does not load: {e}") from None
    return TrainState(params, state, ema, optimizer, payload["step"])
