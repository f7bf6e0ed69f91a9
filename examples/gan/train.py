"""Train a class-conditional GAN with BigGAN's spectral norm, through pfunc.

Every ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` weight of the discriminator (and
of the generator with ``--sn-generator``) gets ``SpectralNorm.biggan(num_svs,
num_itrs, eps=...)`` from :func:`pfunc.spectral.spectral_norm_spec`. Training is
BigGAN's: hinge loss, Adam with ``betas=(0, 0.999)``, the discriminator run once
on real and fake together per D step, both networks in training mode (so the power
iteration advances, and ``sv`` is logged, at every call). The logged singular
values are read with :func:`pfunc.spectral.singular_values` and plotted.

Run from the repository root::

    python -m examples.gan.train --data ring8                  # 8 modes on a circle, ~20 s on 2 CPU cores
    python -m examples.gan.train --data grid25                 # 25 modes on a grid, ~20 s
    python -m examples.gan.train --data shapes --threads 1     # the diffusion example's shapes, 16x16, ~3 minutes
    python -m examples.gan.train --data ring8 --unconditional  # no labels, no projection
    python -m examples.gan.train --data ring8 --steps 50       # smoke test

Each run writes a new folder ``<--results-dir>/<YYYY-mm-dd_HH-MM-SS>_<data>/`` (default
``--results-dir results/gan``; a previous run is never overwritten): ``metrics.json``,
``samples.png``, ``singular_values.png`` (and ``spectrum.png`` when ``--num-svs > 1``).
Progress (losses, time left) goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pfunc as pf
from examples import arguments as A
from examples.atomic import write_atomically
from examples.threads import choose_threads
from examples.gan.tasks import Task, mixture_task, shapes_task
from examples.plots import save_line_plot
from examples.progress import progress
from examples.run_folder import run_in_new_folder
from pfunc.parametrizations import SpectralNorm
from pfunc.spectral import singular_values, spectral_norm_spec

__all__ = ["GAN", "build", "discriminator_step", "generator_step", "sample", "train", "make_task", "main"]

Tree = dict  # dict[str, Tensor]


@dataclass
class GAN:
    """Both networks as pfunc nets with their ``(params, state)`` and optimizers."""

    G: pf.Parametrized
    D: pf.Parametrized
    g_params: Tree
    g_state: Tree
    d_params: Tree
    d_state: Tree
    g_opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    z_dim: int
    num_classes: int


def _spectral(module: nn.Module, sn: Optional[SpectralNorm]) -> pf.Parametrized:
    return pf.parametrize(module, spectral_norm_spec(module, sn) if sn is not None else {})


def build(
    G: nn.Module,
    D: nn.Module,
    *,
    z_dim: int,
    num_classes: int,
    num_svs: int,
    num_itrs: int,
    sn_eps: float,
    sn_generator: bool,
    lr_g: float,
    lr_d: float,
    betas: tuple[float, float],
    seed: int,
    device: torch.device,
) -> GAN:
    """Spectral norm on ``D`` (and ``G``), fresh ``(params, state)`` from ``seed``, Adam for each."""
    sn = SpectralNorm.biggan(num_svs=num_svs, num_itrs=num_itrs, eps=sn_eps)
    g_net, d_net = _spectral(G.to(device), sn if sn_generator else None), _spectral(D.to(device), sn)
    gen = torch.Generator().manual_seed(seed)
    g_params, g_state = g_net.init(generator=gen, values=pf.ensemble.fresh_values(G, gen))
    d_params, d_state = d_net.init(generator=gen, values=pf.ensemble.fresh_values(D, gen))
    return GAN(
        G=g_net,
        D=d_net,
        g_params=g_params,
        g_state=g_state,
        d_params=d_params,
        d_state=d_state,
        g_opt=torch.optim.Adam(g_params.values(), lr=lr_g, betas=betas),
        d_opt=torch.optim.Adam(d_params.values(), lr=lr_d, betas=betas),
        z_dim=z_dim,
        num_classes=num_classes,
    )


def _latents(gan: GAN, n: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    z = torch.randn(n, gan.z_dim, generator=generator).to(device)
    y = torch.randint(0, gan.num_classes, (n,), generator=generator).to(device) if gan.num_classes else None
    return z, y


def _labelled(*args: Optional[Tensor]) -> tuple[Tensor, ...]:
    return tuple(a for a in args if a is not None)


def discriminator_step(gan: GAN, real: Tensor, y_real: Optional[Tensor], z: Tensor, y_fake: Optional[Tensor]) -> float:
    """One hinge-loss D update; real and fake go through D in one call (one power iteration)."""
    with torch.no_grad():
        fake, gan.g_state = gan.G(gan.g_params, gan.g_state, *_labelled(z, y_fake), training=True)
    x = torch.cat([real, fake])
    y = torch.cat([y_real, y_fake]) if y_real is not None else None
    n = real.shape[0]

    def d_loss(params, state):
        scores, state = gan.D(params, state, *_labelled(x, y), training=True)
        return F.relu(1.0 - scores[:n]).mean() + F.relu(1.0 + scores[n:]).mean(), state

    grads, (loss, gan.d_state) = pf.grad_and_value(d_loss, has_aux=True)(gan.d_params, gan.d_state)
    _step(gan.d_opt, gan.d_params, grads)
    return float(loss)


def generator_step(gan: GAN, z: Tensor, y: Optional[Tensor]) -> float:
    """One G update: ``-mean D(G(z, y), y)``; gradients go to G's params only."""

    def g_loss(g_params, g_state, d_state):
        fake, g_state = gan.G(g_params, g_state, *_labelled(z, y), training=True)
        scores, d_state = gan.D(gan.d_params, d_state, *_labelled(fake, y), training=True)
        return -scores.mean(), (g_state, d_state)

    grads, (loss, (gan.g_state, gan.d_state)) = pf.grad_and_value(g_loss, has_aux=True)(gan.g_params, gan.g_state, gan.d_state)
    _step(gan.g_opt, gan.g_params, grads)
    return float(loss)


def _step(opt: torch.optim.Optimizer, params: dict, grads: dict) -> None:
    """One optimizer step with functional gradients (``pf.grad_and_value``'s) in place of ``.grad``."""
    for k, p in params.items():
        p.grad = grads[k]
    opt.step()


def sample(
    gan: GAN, n: int, generator: torch.Generator, device: torch.device, labels: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """``(samples, labels asked for)`` from G with ``training=False`` (spectral norm state untouched,
    every layer in eval mode). Labels are drawn uniformly unless given."""
    z, y = _latents(gan, n, generator, device)
    if labels is not None and gan.num_classes:
        y = labels.to(device)
    with torch.no_grad():
        x, _ = gan.G(gan.g_params, gan.g_state, *_labelled(z, y), training=False)
    return x, y


def _log_singular_values(history: dict[str, list[list[float]]], prefix: str, net: pf.Parametrized, state: Tree) -> None:
    try:
        svs = singular_values(net, state)
    except ValueError:  # a network without spectral norm logs nothing
        return
    for name, sv in svs.items():
        history.setdefault(f"{prefix} {name}", []).append([float(s) for s in sv.cpu()])


def train(
    gan: GAN,
    draw_real: Callable[[int, torch.Generator], tuple[Tensor, Optional[Tensor]]],
    *,
    steps: int,
    batch: int,
    d_steps: int,
    seed: int,
    device: torch.device,
    log_every: int = 100,
    on_log: Callable[[int, dict], None] = lambda step, row: None,
    on_step: Callable[[int, float, float], None] = lambda step, d_loss, g_loss: None,
) -> dict:
    """``steps`` G updates, each after ``d_steps`` D updates; every ``log_every`` steps the
    losses and both networks' logged singular values are recorded (and passed to ``on_log``).
    ``on_step(step, d_loss, g_loss)`` is called after every step (a progress bar)."""
    g = torch.Generator().manual_seed(seed)
    history: dict = {"step": [], "d_loss": [], "g_loss": [], "singular_values": {}}
    d_loss = g_loss = float("nan")
    for step in range(1, steps + 1):
        for _ in range(d_steps):
            real, y_real = draw_real(batch, g)
            z, y_fake = _latents(gan, batch, g, device)
            d_loss = discriminator_step(gan, real.to(device), None if y_real is None else y_real.to(device), z, y_fake)
        z, y = _latents(gan, batch, g, device)
        g_loss = generator_step(gan, z, y)
        on_step(step, d_loss, g_loss)
        if step % log_every == 0 or step == steps:
            history["step"].append(step)
            history["d_loss"].append(d_loss)
            history["g_loss"].append(g_loss)
            _log_singular_values(history["singular_values"], "D", gan.D, gan.d_state)
            _log_singular_values(history["singular_values"], "G", gan.G, gan.g_state)
            latest = {name: rows[-1] for name, rows in history["singular_values"].items()}
            on_log(step, {"d_loss": d_loss, "g_loss": g_loss, "singular_values": latest})
    return history


def _plot_singular_values(out: Path, history: dict, num_svs: int, spectrum_of: str) -> list[str]:
    svs = history["singular_values"]
    written = []
    top = {name: [row[0] for row in rows] for name, rows in svs.items()}
    save_line_plot(out / "singular_values.png", top, title="largest singular value per layer (logged sv[0])",
                   xlabel="generator step", ylabel="sv[0]", log_y=True, x=history["step"])
    written.append("singular_values.png")
    if num_svs > 1:
        spectrum = {f"sv[{i}]": [row[i] for row in svs[spectrum_of]] for i in range(num_svs)}
        save_line_plot(out / "spectrum.png", spectrum, title=f"top {num_svs} logged singular values of {spectrum_of}",
                       xlabel="generator step", ylabel="singular value", x=history["step"])
        written.append("spectrum.png")
    return written


DEFAULTS = {
    # data: (steps, batch, d_steps, lr, log_every)
    "ring8": (4000, 256, 2, 2e-4, 500),
    "grid25": (4000, 256, 2, 2e-4, 500),
    "shapes": (1500, 64, 1, 2e-4, 250),
}


def _parser() -> argparse.ArgumentParser:
    p = A.ArgumentParser(prog="python -m examples.gan.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=tuple(DEFAULTS), default="ring8",
                   help="2-D mixture of Gaussians (ring8, grid25) or the diffusion example's shapes")
    p.add_argument("--steps", type=A.positive_int, default=None, help="generator updates (default per data set)")
    p.add_argument("--d-steps", type=A.positive_int, default=None, help="discriminator updates per generator update")
    p.add_argument("--batch", type=A.positive_int, default=None, help="images or points per batch (default per data set)")
    p.add_argument("--lr-g", type=A.positive_float, default=None, help="generator learning rate (default 2e-4)")
    p.add_argument("--lr-d", type=A.positive_float, default=None, help="discriminator learning rate (default 2e-4)")
    p.add_argument("--beta1", type=A.unit_interval, default=0.0, help="Adam's beta1 (BigGAN: 0)")
    p.add_argument("--beta2", type=A.unit_interval, default=0.999, help="Adam's beta2")
    p.add_argument("--unconditional", action="store_true", help="no labels: no class embedding in G, no projection in D")
    p.add_argument("--num-svs", type=A.positive_int, default=2, help="BigGAN SN: singular values tracked per layer")
    p.add_argument("--num-itrs", type=A.positive_int, default=1, help="BigGAN SN: power iterations per forward")
    p.add_argument("--sn-eps", type=A.positive_float, default=1e-8, help="BigGAN SN: eps of the normalisations")
    p.add_argument("--sn-generator", action=argparse.BooleanOptionalAction, default=None,
                   help="spectral norm on G too (default: on for shapes, off for the 2-D mixtures, where a "
                        "1-Lipschitz G cannot put modes of different classes far enough apart)")
    p.add_argument("--z-dim", type=A.positive_int, default=None, help="latent size (default 8 for 2-D, 64 for shapes)")
    p.add_argument("--hidden", type=A.positive_int, default=128, help="2-D: MLP width")
    p.add_argument("--width", type=A.positive_int, default=64, help="shapes: conv channels")
    p.add_argument("--image-size", type=A.positive_int, default=16, help="shapes: side in pixels (4 * 2**k, at least 8)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="shapes: grayscale or RGB")
    p.add_argument("--train-size", type=A.positive_int, default=8192, help="shapes: images drawn once for training")
    p.add_argument("--judge-steps", type=A.positive_int, default=300, help="shapes: training steps of the scoring classifier")
    p.add_argument("--eval-samples", type=A.positive_int, default=None,
                   help="samples scored at the end (2500 for 2-D, 1000 for shapes)")
    p.add_argument("--min-count", type=A.positive_int, default=20, help="2-D: high-quality samples a mode needs to count as hit")
    p.add_argument("--log-every", type=A.positive_int, default=None,
                   help="steps between scored log points (default per data set; also the progress lines in a log)")
    p.add_argument("--seed", type=A.seed, default=0, help="seed of the initialisation, the data and the latents")
    p.add_argument("--device", type=A.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1... (default: cuda when there is one)")
    p.add_argument("--threads", type=A.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy machine)")
    p.add_argument("--results-dir", default="results/gan",
                   help="parent of the run folder <YYYY-mm-dd_HH-MM-SS>_<data> (default results/gan)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    steps, batch, d_steps, lr, log_every = DEFAULTS[args.data]
    image = args.data == "shapes"
    for name, value in (("steps", steps), ("batch", batch), ("d_steps", d_steps), ("lr_g", lr), ("lr_d", lr),
                        ("log_every", log_every), ("z_dim", 64 if image else 8),
                        ("eval_samples", 1000 if image else 2500), ("sn_generator", image)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    size = args.image_size
    if image and (size < 8 or size % 4 or (size // 4) & (size // 4 - 1)):
        _parser().error(f"argument --image-size: must be 4 * 2**k and at least 8 (8, 16, 32...), got {size}")
    if image and args.eval_samples < 2:
        _parser().error(f"argument --eval-samples: the Fréchet distance needs at least 2 samples, got {args.eval_samples}")
    return args


def make_task(args: argparse.Namespace, device: torch.device) -> Task:
    """The :class:`~examples.gan.tasks.Task` the arguments name."""
    if args.data == "shapes":
        return shapes_task(image_size=args.image_size, channels=args.channels, conditional=not args.unconditional,
                           z_dim=args.z_dim, width=args.width, train_size=args.train_size,
                           judge_steps=args.judge_steps, seed=args.seed, device=device)
    return mixture_task(args.data, conditional=not args.unconditional, z_dim=args.z_dim, hidden=args.hidden,
                        min_count=args.min_count, seed=args.seed)


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line: parse, make the run folder, train, score, write. Returns the metrics
    (with ``"run_folder"``). Bad flags exit with status 2, an unusable results folder with 1,
    Ctrl-C with 130 (a run folder with nothing in it yet is removed), each with one line."""
    args = _resolve(_parser().parse_args(argv))
    return run_in_new_folder(args.results_dir, args.data, lambda out: _run(args, out))


def _run(args: argparse.Namespace, out: Path) -> dict:
    note = choose_threads(args.threads)
    if note:
        print(note, file=sys.stderr)
    device = args.device
    if args.data == "shapes":
        print(f"training the scoring classifier ({args.judge_steps} steps)...", file=sys.stderr)
    task = make_task(args, device)
    gan = build(
        task.generator, task.discriminator, z_dim=task.z_dim, num_classes=task.num_classes,
        num_svs=args.num_svs, num_itrs=args.num_itrs, sn_eps=args.sn_eps, sn_generator=args.sn_generator,
        lr_g=args.lr_g, lr_d=args.lr_d, betas=(args.beta1, args.beta2), seed=args.seed, device=device,
    )
    print(f"{args.data}: {'conditional, ' + str(task.num_classes) + ' classes' if task.num_classes else 'unconditional'}; "
          f"SpectralNorm.biggan(num_svs={args.num_svs}, num_itrs={args.num_itrs}, eps={args.sn_eps}) on "
          f"D: {list(gan.D.chains)}" + (f"; G: {list(gan.G.chains)}" if gan.G.chains else "; G: none"))
    print(f"run folder: {out}")
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    quick_n = min(args.eval_samples, 500) if args.data == "shapes" else args.eval_samples  # 2-D: same count as the end
    curve: dict[str, list] = {"step": [], "score": []}
    t0 = time.perf_counter()
    bar = progress(args.steps, desc=f"gan {args.data}", unit="step", log_every=args.log_every)

    def on_step(step, d_loss, g_loss):
        bar.update(d_loss=d_loss, g_loss=g_loss)

    def on_log(step, row):
        x, y = sample(gan, quick_n, eval_gen, device)
        scores = task.score(x, y)
        curve["step"].append(step)
        curve["score"].append(scores)
        d_sv = {k[2:]: round(v[0], 3) for k, v in row["singular_values"].items() if k.startswith("D ")}
        bar.write(f"step {step:5d}  d_loss {row['d_loss']:.3f}  g_loss {row['g_loss']:+.3f}  {task.describe(scores)}  "
                  f"D sv[0] {d_sv}  ({time.perf_counter() - t0:.0f}s)")

    with bar:
        history = train(gan, task.draw_real, steps=args.steps, batch=args.batch, d_steps=args.d_steps, seed=args.seed,
                        device=device, log_every=args.log_every, on_log=on_log, on_step=on_step)
    seconds = time.perf_counter() - t0
    print(f"scoring {args.eval_samples} samples...", file=sys.stderr)
    x, y = sample(gan, args.eval_samples, eval_gen, device)
    final = task.final_score(x, y)
    print(f"final ({args.eval_samples} samples, {seconds:.0f}s of training): {task.describe(final)}")
    if task.num_classes and args.data == "shapes":
        rows = torch.arange(task.num_classes).repeat_interleave(8)
        x, y = sample(gan, len(rows), eval_gen, device, labels=rows)
    task.save_samples(out / "samples.png", x, y, f"{args.data}, step {args.steps}")
    largest = max(gan.D.chains, key=lambda name: gan.D.module.get_parameter(name).numel())
    written = ["samples.png", *_plot_singular_values(out, history, args.num_svs, f"D {largest}")]
    metrics = {
        "final": final,
        "curve": curve,
        "singular_values": history["singular_values"],
        "losses": {"step": history["step"], "d": history["d_loss"], "g": history["g_loss"]},
        "train_seconds": seconds,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    write_atomically(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()), what="gan")
    written.append("metrics.json")
    print(f"wrote {', '.join(written)} in {out}")
    return {**metrics, "run_folder": str(out)}


if __name__ == "__main__":
    main()
