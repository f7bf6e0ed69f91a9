"""denoising-diffusion-pytorch's model code (its ``Unet`` and blocks), loaded without importing the package.

The package's ``__init__`` pulls torchvision, accelerate, ema-pytorch and pytorch-fid (its data,
trainer and FID), none of which its ``Unet`` uses; the CPU torch wheel and the registry's
torchvision do not even import side by side. So the model code, everything in
``denoising_diffusion_pytorch.py`` before its diffusion process, is read from the package's
files and run on its own, with ``attend.py``'s ``Attend`` (2.x) supplied the same way.

``where`` is a folder holding the package (``.../site-packages``, an unpacked wheel) or the
package folder itself, or a wheel file; by default the installed package (the ``benchmarks``
extra installs 2.3.4: ``pip install -e ".[benchmarks]"``).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import types
import zipfile
from typing import Any, Optional, Union

__all__ = ["ReferenceUnavailable", "package_folder", "load_model_code", "load_diffusion_code", "build", "stateful_trainer",
           "version"]

PACKAGE = "denoising_diffusion_pytorch"
# Imports of the package's module that its model code does not use (data, training, FID, type checks).
UNUSED_IMPORTS = ("from torchvision", "from PIL", "from tqdm", "from ema_pytorch", "from accelerate",
                  "from pytorch_fid", "from scipy", f"from {PACKAGE}.version", f"from {PACKAGE}.attend",
                  "from beartype", "from jaxtyping", "from multiprocessing")


class ReferenceUnavailable(RuntimeError):
    """denoising-diffusion-pytorch (or what its model code needs) is not where it was looked for; the message says how to get it."""


def package_folder(where: Union[str, pathlib.Path, None] = None) -> pathlib.Path:
    """The ``denoising_diffusion_pytorch`` folder in ``where`` (see the module docstring), or the installed one."""
    if where is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ReferenceUnavailable(f"{PACKAGE} is not installed: pip install -e \".[benchmarks]\" (2.3.4), or "
                                       f"pip install --no-deps denoising-diffusion-pytorch==1.5.0 einops")
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    path = pathlib.Path(where)
    if path.is_file() and path.suffix == ".whl":
        target = path.with_suffix("")
        if not (target / PACKAGE).is_dir():
            with zipfile.ZipFile(path) as wheel:
                wheel.extractall(target)
        path = target
    for candidate in (path, path / PACKAGE):
        if (candidate / f"{PACKAGE}.py").is_file():
            return candidate
    raise ReferenceUnavailable(f"{where}: holds no {PACKAGE}/{PACKAGE}.py (give a site-packages folder, an unpacked or "
                               f"packed wheel, or the package folder)")


def version(where: Union[str, pathlib.Path, None] = None) -> str:
    """The release of the package in ``where`` (its ``version.py``, else the dist-info folder beside it)."""
    folder = package_folder(where)
    version_file = folder / "version.py"
    if version_file.is_file():
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        if found:
            return found.group(1)
    for info in folder.parent.glob("denoising_diffusion_pytorch-*.dist-info"):
        return info.name.split("-")[1]
    return "unknown"


def _exec(name: str, source: str, filename: str, namespace: Optional[dict] = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(namespace or {})
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def load_model_code(where: Union[str, pathlib.Path, None] = None) -> types.ModuleType:
    """A module holding the package's ``Unet`` and its blocks (everything before its diffusion process).

    :class:`ReferenceUnavailable` when the package or einops (which its model code uses) is missing.
    """
    return _load(where, whole=False)


def load_diffusion_code(where: Union[str, pathlib.Path, None] = None) -> types.ModuleType:
    """The package's whole ``denoising_diffusion_pytorch`` module, its ``GaussianDiffusion`` included, without
    the imports only its ``Dataset`` and ``Trainer`` use (calling those fails; ``tqdm`` is a pass-through)."""
    return _load(where, whole=True)


def _load(where: Union[str, pathlib.Path, None], whole: bool) -> types.ModuleType:
    folder = package_folder(where)
    if importlib.util.find_spec("einops") is None:
        raise ReferenceUnavailable(f"{PACKAGE}'s model code needs einops: pip install einops")
    source_file = folder / f"{PACKAGE}.py"
    source = source_file.read_text()
    model_code = source if whole else source.split("def extract(a, t, x_shape):")[0]
    model_code = "\n".join(line for line in model_code.splitlines() if not line.startswith(UNUSED_IMPORTS))
    namespace: dict = {"tqdm": lambda iterable, *args, **kwargs: iterable, "__version__": version(folder)} if whole else {}
    attend_file = folder / "attend.py"
    if f"from {PACKAGE}.attend import Attend" in source:
        namespace["Attend"] = _exec(f"{PACKAGE}_attend", attend_file.read_text(), str(attend_file)).Attend
    return _exec(f"{PACKAGE}_model", model_code, str(source_file), namespace)


def build(cfg: Any, where: Union[str, pathlib.Path, None] = None) -> tuple[Any, Any]:
    """``(unet, process)``: the package's ``Unet`` with the sizes of ``cfg`` (an ``examples.diffusion`` ``TrainConfig``),
    built under ``torch.manual_seed(cfg.seed)`` as the main job builds its own (so 2.x gives the modern layout's
    weights value for value), and its ``GaussianDiffusion`` with ``cfg``'s image size, steps, objective and schedule."""
    import torch

    code = load_diffusion_code(where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sizes = dict(dim=cfg.dim, dim_mults=cfg.dim_mults, channels=cfg.channels)
        try:
            unet = code.Unet(**sizes, attn_heads=cfg.attn_heads, attn_dim_head=cfg.attn_dim_head)
        except TypeError:  # releases before 1.6 have fixed attention sizes (4 heads of 32)
            unet = code.Unet(**sizes, resnet_block_groups=cfg.resnet_block_groups)
    process = code.GaussianDiffusion(unet, image_size=cfg.image_size, timesteps=cfg.timesteps, objective=cfg.objective,
                                     beta_schedule=cfg.beta_schedule)
    return unet, process


def stateful_trainer(cfg: Any, where: Union[str, pathlib.Path, None] = None, device: Any = "cpu") -> tuple[Any, dict, Any]:
    """``(unet, ema, step)``: the package's network and process (:func:`build`) trained the way its users train it,
    with the main job's optimizer and EMA rule. ``step(x0, t, noise)`` is one optimizer step on its
    ``p_losses`` (``loss.backward()``, clipping at ``cfg.max_grad_norm``, AdamW as
    :func:`examples.diffusion.training.make_optimizer`, then :func:`~examples.diffusion.training.update_ema` on
    ``ema``, the EMA of the parameters by name) and returns the loss."""
    import torch

    from examples.diffusion.training import make_optimizer, update_ema

    unet, process = build(cfg, where)
    unet, process = unet.to(device), process.to(device)
    params = dict(unet.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    steps_done = 0

    def step(x0: Any, t: Any, noise: Any) -> Any:
        nonlocal steps_done
        loss = process.p_losses(x0, t, noise=noise)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done += 1
        update_ema(ema, params, steps_done, cfg.ema_decay, cfg.ema_every, cfg.ema_after)
        return loss.detach()

    return unet, ema, step
