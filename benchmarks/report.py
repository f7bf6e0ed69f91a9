"""BENCHMARKS.md: tables of medians and ratios per comparison family, the goals' status, and the file's layout.

The file has one section per device (``cpu``, ``cuda``) between ``<!-- BEGIN <device> -->``
and ``<!-- END <device> -->`` markers, and a hand-written ``notes`` block between the same
kind of markers; a run rewrites its own device's section and keeps the others as they are.

>>> fmt_seconds(0.000123), fmt_seconds(0.0456), fmt_seconds(2.5)
('123 µs', '45.6 ms', '2.50 s')
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from .comparison import Row

__all__ = ["fmt_seconds", "table", "Goal", "goals", "device_section", "assemble", "SECTION_TITLES"]

SECTION_TITLES = {
    "layers": "1. Parametrized layer and 4-layer MLP (eager)",
    "caching": "2. Explicit caching: one orthogonal kernel reused for T steps",
    "ensembles": "3. Ensembles: one training step of N spectrally normalised MLPs",
    "power_iteration": "4. Power iteration: spectral norms of K matrices",
    "compiled": "5. torch.compile",
    "unet": "6. Diffusion Unet training step",
    "call_overhead": "7. The cost of a call: a deep model of tiny layers",
    "distributed": "8. Data parallel: the main job's step on 1 and 2 processes (torchrun, gloo)",
    "adapters": "9. Adapters: one training step of N LoRA adapters on one frozen base",
    "reference_diffusion": "10. The main job against denoising-diffusion-pytorch: one training step",
}


def fmt_seconds(s: float) -> str:
    """Seconds in the unit that gives three significant digits or so."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.2f} s"


def _cell(row: Row, name: str) -> str:
    t = row.timing
    if t is None:
        return "-"
    spread = (t.q3[name] - t.q1[name]) / 2 / t.medians[name]
    return f"{fmt_seconds(t.medians[name])} ±{100 * spread:.0f}%"


def _union(lists: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for xs in lists:
        for x in xs:
            seen.setdefault(x, None)
    return list(seen)


def _rounds(row: Row) -> str:
    t = row.timing
    if t is None:
        return "-"
    if t.clock != "cpu":
        return str(t.repeats)
    wall_over_cpu = statistics.median(t.wall_medians[n] / t.medians[n] for n in t.medians if t.medians[n] > 0)
    return f"{t.repeats} (wall x{wall_over_cpu:.1f})"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: the rows' labels, each variant's median (± half the IQR), each ratio,
    rounds, extras. Columns are the union over the rows (a row without one leaves it empty)."""
    if not rows:
        return "_no rows_\n"
    labels = _union(r.comparison.labels for r in rows)
    variants = _union(r.comparison.variants for r in rows)
    ratios = _union(r.comparison.ratios for r in rows)
    extras = _union((k for k in r.extras if not k.startswith("_")) for r in rows)
    head = labels + variants + [f"{a} / {b}" for a, b in ratios] + ["rounds"] + extras
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        c = row.comparison
        cells = [c.labels.get(k, "") for k in labels]
        cells += [_cell(row, v) if v in c.variants else "" for v in variants]
        cells += [f"**{row.ratio(a, b):.2f}**" if row.timing and (a, b) in c.ratios else ("-" if (a, b) in c.ratios else "") for a, b in ratios]
        cells.append(_rounds(row))
        cells += [row.extras.get(k, "") for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Goal:
    """One goal of the issue, whether it is met, and the numbers that say so."""

    text: str
    status: str
    evidence: str


def _rows(rows: Iterable[Row], family: str) -> list[Row]:
    return [r for r in rows if r.comparison.family == family and r.timing is not None]


def _name(row: Row) -> str:
    return ", ".join(row.comparison.labels.values())


def _tally(pairs: list[tuple[Row, float]], ok, worst_first: bool = True, show: int = 4) -> tuple[str, str]:
    if not pairs:
        return "not measured", ""
    good = [p for p in pairs if ok(p[1])]
    bad = sorted((p for p in pairs if not ok(p[1])), key=lambda p: p[1], reverse=worst_first)
    status = "met" if len(good) == len(pairs) else f"not met ({len(good)} of {len(pairs)} rows)"
    if bad:
        evidence = "misses: " + "; ".join(f"{_name(r)} {x:.2f}" for r, x in bad[:show]) + ("; ..." if len(bad) > show else "")
    else:
        worst = max(pairs, key=lambda p: p[1]) if worst_first else min(pairs, key=lambda p: p[1])
        evidence = f"worst: {_name(worst[0])} {worst[1]:.2f}"
    return status, evidence


def goals(rows: Sequence[Row], device: str) -> list[Goal]:
    """The issue's goals judged on ``rows`` (ratios of medians)."""
    out = []
    layers = _rows(rows, "layers")
    caching = _rows(rows, "caching")
    floor_pairs = [(r, r.ratio("pfunc", "floor")) for r in layers + caching]
    status, ev = _tally(floor_pairs, lambda x: x <= 1.10)
    out.append(Goal("pfunc within 10% of the hand-written floor in every eager row (items 1, 2: pfunc / floor <= 1.10)", status, ev))
    torch_pairs = [(r, r.ratio("pfunc", "torch")) for r in layers] + [(r, r.ratio("pfunc", "torch cached")) for r in caching]
    status, ev = _tally(torch_pairs, lambda x: x <= 1.0)
    close = sum(1 for _, x in torch_pairs if x <= 1.05)
    out.append(Goal(
        "pfunc no slower than torch's parametrize in every eager row (items 1, 2: pfunc / torch <= 1.00)",
        status, ev + (f" ({close} of {len(torch_pairs)} rows within 5%)" if torch_pairs else ""),
    ))
    grad_rows = [r for r in layers if "pfunc pf.grad" in r.comparison.variants]
    status, ev = _tally([(r, r.ratio("pfunc pf.grad", "floor")) for r in grad_rows], lambda x: x <= 1.10)
    out.append(Goal("pf.grad within 10% of the hand-written floor in every fwd+bwd row (item 1: pfunc pf.grad / floor <= 1.10)", status, ev))
    recompute = [(r, r.ratio("pfunc", "torch")) for r in caching]
    recompute += [(r, r.ratio("pfunc", "torch")) for r in layers if r.comparison.labels.get("parametrization") == "SpectralNorm" and r.comparison.labels.get("mode") == "train"]
    status, ev = _tally(recompute, lambda x: x < 1.0)
    out.append(Goal("pfunc faster than torch where torch recomputes (uncached reuse; spectral norm in training): pfunc / torch < 1", status, ev))
    ens = [r for r in _rows(rows, "ensembles") if r.comparison.labels.get("N") == "32"]
    need = 0.2
    if ens:
        ev_parts = []
        best = None
        for variant in ("pfunc vmap", "pfunc vmap+backward"):
            if variant not in ens[0].comparison.variants:
                continue
            x = ens[0].ratio(variant, "torch loop")
            best = x if best is None else min(best, x)
            others = [(r.comparison.labels["N"], r.ratio(variant, "torch loop")) for r in _rows(rows, "ensembles")]
            ev_parts.append(
                f"{variant}: N=32 {x:.2f} of the loop ({1 / x:.1f}x faster); all N: "
                + ", ".join(f"N={n} {1 / v:.1f}x" for n, v in others)
            )
        status = "not measured" if best is None else ("met" if best <= need else "not met")
        ev = "; ".join(ev_parts)
    else:
        status, ev = "not measured", ""
    out.append(Goal(f"vmap ensembles at least 5x faster than the loop at N=32 ({device})", status, ev))
    out.append(_ensemble_grad_goal(rows))
    compiled = [r for r in rows if r.comparison.family == "compiled"]
    if compiled:
        breaks = [(r, b) for r in compiled for k, b in r.comparison.facts.get("breaks", {}).items() if k.startswith("pfunc")]
        in_pfunc = sum(b.in_pfunc for _, b in breaks)
        total = sum(b.breaks for _, b in breaks)
        out.append(Goal(
            "pfunc compiles without graph breaks in pfunc code (torch._dynamo.explain)",
            "met" if in_pfunc == 0 else "not met",
            f"{in_pfunc} breaks in pfunc code, {total} in all, over {len(breaks)} compiled pfunc functions",
        ))
        timed = [r for r in compiled if r.timing is not None]
        status, ev = _tally([(r, r.ratio("pfunc compiled", "pfunc eager")) for r in timed], lambda x: x < 1.0)
        out.append(Goal("compiled pfunc faster than eager pfunc (pfunc compiled / pfunc eager < 1)", status, ev))
        with_pf = [r for r in timed if "pfunc pf.grad compiled" in r.comparison.variants]
        status, ev = _tally([(r, r.ratio("pfunc pf.grad compiled", "pfunc compiled")) for r in with_pf], lambda x: x <= 1.05)
        out.append(Goal("compiled pf.grad no slower than the compiled autograd route (pfunc pf.grad compiled / pfunc compiled <= 1.05)", status, ev))
    else:
        out.append(Goal("pfunc compiles without graph breaks in pfunc code", "not measured", ""))
    out.append(_unet_goal(rows))
    out.append(_power_goal(rows))
    out.append(_power_vmap_goal(rows))
    out.append(_reference_diffusion_goal(rows))
    return out


def _power_goal(rows: Sequence[Row]) -> Goal:
    """Item 4: the vmapped call within 1.05x of the fastest of pfunc's loop of ``mv`` and the hand-batched products."""
    text = "vmapped power iteration at most 1.05x the fastest of {loop of mv, batched product} (item 4: pfunc vmap / fastest)"
    pairs = []
    for r in _rows(rows, "power_iteration"):
        rivals = [v for v in ("pfunc loop", "floor", "floor rows") if v in r.comparison.variants]
        fastest = min(r.timing.medians[v] for v in rivals)
        pairs.append((r, r.timing.medians["pfunc vmap"] / fastest))
    return Goal(text, *_tally(pairs, lambda x: x <= 1.05))


def _power_vmap_goal(rows: Sequence[Row]) -> Goal:
    """Item 4: the vmapped call within 1.05x of the same math written by hand under the same ``vmap``."""
    text = "vmapped power iteration at most 1.05x the hand-written row form under the same vmap (item 4: pfunc vmap / floor rows vmap)"
    found = [r for r in _rows(rows, "power_iteration") if "floor rows vmap" in r.comparison.variants]
    return Goal(text, *_tally([(r, r.ratio("pfunc vmap", "floor rows vmap")) for r in found], lambda x: x <= 1.05))


def _reference_diffusion_goal(rows: Sequence[Row]) -> Goal:
    """Item 10: the main job's step at least as fast as denoising-diffusion-pytorch's, in every variant timed."""
    text = "the main job's step at least as fast as denoising-diffusion-pytorch's (item 10: pfunc / ddpm <= 1.00)"
    found = _rows(rows, "reference_diffusion")
    names = [v for r in found[:1] for v in r.comparison.variants if v != "ddpm"]
    pairs = [(r, r.ratio(v, "ddpm")) for r in found for v in names]
    status, evidence = _tally(pairs, lambda x: x <= 1.0)
    if pairs:
        evidence += "; " + ", ".join(f"{v} {found[0].ratio(v, 'ddpm'):.2f}" for v in names)
    return Goal(text, status, evidence)


def _ensemble_grad_goal(rows: Sequence[Row]) -> Goal:
    """Item 3: ``pf.ensemble.grad_and_value`` >= 6x the loop at N=32; ``vmap(pf.grad_and_value)``
    equal to the solo runs (the loop), which ``Comparison.check`` enforced before timing."""
    text = "pf.ensemble.grad_and_value at least 6x faster than the loop at N=32; vmap(pf.grad_and_value) equal to the solo runs"
    ens = [r for r in _rows(rows, "ensembles") if "pfunc ensemble.grad_and_value" in r.comparison.variants]
    at32 = [r for r in ens if r.comparison.labels.get("N") == "32"]
    if not at32:
        return Goal(text, "not measured", "")
    x = at32[0].ratio("pfunc ensemble.grad_and_value", "torch loop")
    others = ", ".join(f"N={r.comparison.labels['N']} {1 / r.ratio('pfunc ensemble.grad_and_value', 'torch loop'):.1f}x" for r in ens)
    equal = all("pfunc vmap(pf.grad)" in r.comparison.variants for r in ens)
    rtol = at32[0].comparison.rtol
    evidence = f"N=32 {x:.2f} of the loop ({1 / x:.1f}x faster); all N: {others}; " + (
        f"vmap(pf.grad_and_value) checked equal to the loop of solo runs in every row (rtol {rtol:g})" if equal else "vmap(pf.grad_and_value) not run"
    )
    return Goal(text, "met" if x <= 1 / 6 and equal else "not met", evidence)


def _unet_goal(rows: Sequence[Row]) -> Goal:
    """Item 6: the ``pf.grad_and_value`` step / torch's stateful step <= 1.00 in time and <= 1.05 in peak memory."""
    text = "Unet step: pf.grad_and_value / torch stateful loss.backward() <= 1.00 in time and <= 1.05 in peak memory (item 6)"
    unet = [r for r in _rows(rows, "unet") if "pfunc pf.grad" in r.comparison.variants]
    if not unet:
        return Goal(text, "not measured", "")
    parts, ok = [], True
    for r in unet:
        time_ratio = r.ratio("pfunc pf.grad", "torch")
        ok &= time_ratio <= 1.00
        part = f"{_name(r)}: time {time_ratio:.3f}"
        for label, key in (("peak", "peak MB"), ("peak RSS", "peak RSS MB")):
            a, b = r.extras.get(f"{key} (pfunc pf.grad)"), r.extras.get(f"{key} (torch)")
            if a is not None and b is not None and float(b) > 0:
                mem = float(a) / float(b)
                ok &= mem <= 1.05
                part += f", {label} {mem:.2f} ({a} vs {b} MB)"
        parts.append(part)
    return Goal(text, "met" if ok else "not met", "; ".join(parts))


def device_section(
    device: str,
    command: str,
    machine: Mapping[str, str],
    rows: Sequence[Row],
    notes: Mapping[str, Sequence[str]],
    descriptions: Mapping[str, str],
    method: str,
) -> str:
    """The Markdown section for one device: machine, command, goals, one table per family."""
    lines = [f"<!-- BEGIN {device} -->", f"## {device.upper()} results", ""]
    lines += [f"Command: `{command}`", ""]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    lines += ["", method, "", "### Goals", "", "| goal | status | evidence |", "|---|---|---|"]
    for g in goals(rows, device):
        lines.append(f"| {g.text} | {g.status} | {g.evidence} |")
    lines.append("")
    for family, title in SECTION_TITLES.items():
        fam_rows = [r for r in rows if r.comparison.family == family]
        fam_notes = list(notes.get(family, ()))
        if not fam_rows and not fam_notes:
            continue
        lines += [f"### {title}", "", descriptions.get(family, "").strip(), ""]
        if fam_rows:
            lines.append(table(fam_rows))
        lines += [f"- {n}" for n in fam_notes]
        lines.append("")
    lines.append(f"<!-- END {device} -->")
    return "\n".join(lines) + "\n"


_BLOCK = re.compile(r"<!-- BEGIN (\w+) -->.*?<!-- END \1 -->\n?", re.S)


def _blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in _BLOCK.finditer(text)}


def assemble(existing: Optional[str], header: str, device: str, section: str, placeholders: Mapping[str, str]) -> str:
    """The whole file: ``header``, the notes block and every device section, this ``device``'s
    replaced by ``section``, others kept from ``existing`` (or ``placeholders`` where absent)."""
    blocks = _blocks(existing or "")
    blocks[device] = section
    parts = [header.rstrip() + "\n"]
    if "notes" in blocks:
        parts.append(blocks["notes"])
    for dev in ("cpu", "cuda"):
        if dev in blocks:
            parts.append(blocks[dev])
        elif dev in placeholders:
            parts.append(f"<!-- BEGIN {dev} -->\n{placeholders[dev].rstrip()}\n<!-- END {dev} -->\n")
    return "\n".join(parts)
