"""Healing benchmark (issue 22): Skrr, Skrr+heal (final-plan lstsq healing), ReplaceMe, ShortGPT(+heal).

    python bench/bench_heal.py builtin --prompts builtin --heldout builtin-heldout --sparsity 0.2,0.3 \
        --out bench/results/heal_minilm_cpu.txt
    python bench/bench_heal.py builtin-llm --prompts ../shared/data/prompts/iiw_locnar_eval.jsonl --field IIW-P5B \
        --limit 16 --max-length 32 --chunk-size 4 --template $'<|im_start|>user\n{prompt}<|im_end|>' \
        --heldout builtin-heldout --sparsity 0.2,0.3,0.4 \
        --plans-from bench/results/compare_smollm2/rows.jsonl --out bench/results/heal_smollm2_cpu.txt

With --plans-from, the Skrr plans (and the Skrr search's wall time) are the rows of an earlier `compare` on the
same calibration set (a Skrr search of SmolLM2 takes 25-45 min on 2 CPU cores); healing is then timed alone
on the same calibration tokens. Without it, Skrr is searched here with heal="lstsq" and the unhealed plan is
the same plan without its maps. Held-out D, cosine and null-norm ratio are measured on --heldout.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import skrr_compile as skrr
from skrr_compile.blocksearch.config import HealConfig
from skrr_compile.blocksearch.discrepancy import last_hidden_state
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.heal import heal_plan
from skrr_compile.blocksearch.run import heldout_report, materialize, prepare_calibration, search
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.core.checkpoints import load_encoder, load_tokenizer, resolve_model_path


def _tokens(cal) -> int:
    return int(sum(int(cal.read_mask(mask).sum()) for _, mask in cal.chunks))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompts", required=True)
    p.add_argument("--field")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--template")
    p.add_argument("--heldout", required=True)
    p.add_argument("--heldout-limit", type=int)
    p.add_argument("--sparsity", required=True)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--plans-from", help="rows.jsonl of an earlier compare (or of this script): its skrr plans and "
                   "wall times")
    p.add_argument("--heal-prompts", help="prompts for the healing statistics and calibration D (default: --prompts)")
    p.add_argument("--heal-field")
    p.add_argument("--heal-limit", type=int)
    p.add_argument("--heal-max-length", type=int)
    p.add_argument("--heal-ridge", default="auto", help="auto (cross-validated, the default) or a relative ridge")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ridge = args.heal_ridge if args.heal_ridge == "auto" else float(args.heal_ridge)
    torch.set_num_threads(2)
    t_load = time.perf_counter()
    path = resolve_model_path(args.model)
    model, tok = load_encoder(path), load_tokenizer(path)
    graph = skrr.trace(model)
    print(f"loaded and traced in {time.perf_counter() - t_load:.0f} s", flush=True)
    cal = prepare_calibration(tok, args.prompts, field=args.field, limit=args.limit, max_length=args.max_length,
                              chunk_size=args.chunk_size, template=args.template)
    heal_cal = cal if args.heal_prompts is None else prepare_calibration(
        tok, args.heal_prompts, field=args.heal_field, limit=args.heal_limit, max_length=args.heal_max_length,
        chunk_size=args.chunk_size, template=args.template)
    print(f"calibration: {cal.num_prompts} prompts, {_tokens(cal)} read tokens; healing: {heal_cal.num_prompts} "
          f"prompts, {_tokens(heal_cal)} read tokens", flush=True)
    held = prepare_calibration(tok, args.heldout, limit=args.heldout_limit, max_length=args.max_length,
                               chunk_size=args.chunk_size, template=args.template)
    old, finercut = {}, {}
    if args.plans_from:
        for line in Path(args.plans_from).read_text().splitlines():
            r = json.loads(line)
            if r["method"] in ("skrr", "finercut") and "skip" in r:
                (old if r["method"] == "skrr" else finercut)[round(r["target"], 4)] = r
    rows, notes = [], []

    def row(method, s, pruned, calib_d, seconds, heal_s=None, extra="", runs=None):
        h = heldout_report(model, pruned, held)
        plan = pruned.plan
        rows.append({"method": method, "target": s, "sparsity": pruned.sparsity, "calib_D": calib_d,
                     "heldout_D": h["discrepancy"], "cosine": h["cosine"], "null_norm": h["null_norm_ratio"],
                     "seconds": seconds, "heal_seconds": heal_s,
                     # what healing adds to the search's wall time
                     "heal_share": None if heal_s is None else heal_s / (seconds - heal_s), "note": extra,
                     "skip": list(plan.skip), "reuse": {str(k): v for k, v in plan.reuse.items()},
                     "heal_runs": runs})
        print(json.dumps(rows[-1]), flush=True)

    def show(rep):
        for e in rep["runs"]:
            print("  heal run", e["run"], "into", e["kept"], "accepted" if e.get("accepted") else "refused",
                  {k: (round(v, 5) if isinstance(v, float) else v) for k, v in e.items()
                   if k in ("tokens", "ridge", "fit_error_before", "fit_error_after", "discrepancy_before",
                            "discrepancy_after", "reason")}, flush=True)
        return [{k: v for k, v in e.items() if k not in ("weight", "bias")} for e in rep["runs"]]

    for s in [float(x) for x in args.sparsity.split(",")]:
        if s in old:  # the earlier search's plan; healing timed here on the same calibration tokens
            r = old[s]
            plan = skrr.Plan(skip=r["skip"], reuse={int(k): v for k, v in r["reuse"].items()}, method="skrr")
            base = skrr.apply(graph, plan)
            ev = Evaluator(StagedRunner(graph), heal_cal, None, last_hidden_state, cache_bytes=1 << 30)
            t0 = time.perf_counter()
            healed_plan, merged, rep = heal_plan(graph, ev, plan, {}, HealConfig(heal="lstsq", heal_ridge=ridge), progress=True)
            heal_s = time.perf_counter() - t0
            ev.disc.reference.close()
            runs = show(rep)
            row("skrr", s, base, rep["discrepancy_before"], r["seconds"], extra="plan + search time from --plans-from")
            row("skrr+heal", s, skrr.apply(graph, healed_plan, merged=merged), rep["discrepancy_after"],
                r["seconds"] + heal_s, heal_s, f"{rep['healed_runs']}/{len(rep['runs'])} runs healed", runs)
        else:
            res = search(model, tok, cal, sparsity=s, beam=args.beam, heal="lstsq", heal_ridge=ridge, graph=graph,
                             progress=False)
            rep = res.report["heal"]
            runs = show(rep)
            base = skrr.apply(graph, skrr.Plan(skip=res.plan.skip, reuse=res.plan.reuse))
            row("skrr", s, base, rep["discrepancy_before"], res.report["seconds"] - rep["seconds"])
            row("skrr+heal", s, materialize(graph, res), rep["discrepancy_after"], res.report["seconds"],
                rep["seconds"], f"{rep['healed_runs']}/{len(rep['runs'])} runs healed", runs)
        if s in finercut:  # FinerCut's plan from the same compare, scored here on the same tokens
            r = finercut[s]
            pruned = skrr.apply(graph, skrr.Plan(skip=r["skip"], method="finercut"))
            ev = Evaluator(StagedRunner(graph), heal_cal, None, last_hidden_state, cache_bytes=0)
            calib_d = ev.report(Config(frozenset(r["skip"]), ())).discrepancy
            ev.disc.reference.close()
            row("finercut", s, pruned, calib_d, r["seconds"], extra="plan + search time from --plans-from")
        for method in ("replaceme", "shortgpt"):
            t0 = time.perf_counter()
            try:
                res = search(model, tok, heal_cal, sparsity=s, method=method, heal="lstsq", heal_ridge=ridge, graph=graph,
                             progress=False)
            except skrr.SearchError as e:
                notes.append(f"{method} at {s}: {e}")
                continue
            name = "replaceme" if method == "replaceme" else "shortgpt+heal"
            rep = res.report["heal"]
            runs = show(rep)
            if method == "shortgpt":
                row("shortgpt", s, skrr.apply(graph, skrr.Plan(skip=res.plan.skip)), rep["discrepancy_before"],
                    time.perf_counter() - t0 - rep["seconds"])
            row(name, s, materialize(graph, res), rep["discrepancy_after"], time.perf_counter() - t0, rep["seconds"],
                f"{rep['healed_runs']}/{len(rep['runs'])} runs healed; skip {list(res.plan.skip)}", runs)
    lines = ["# bench/bench_heal.py: " + " ".join(shlex.quote(a) for a in sys.argv),
             f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 2 threads, fp32; "
             f"{cal.num_prompts} calibration prompts, {held.num_prompts} held-out prompts; heal ridge {ridge}",
             "", "| method | target | sparsity | calib D | held-out D | cosine | null-norm ratio | wall s | heal s | "
             "heal share | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f="{:.4f}": "" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['method']} | {r['target']:.2f} | {r['sparsity']:.4f} | {fmt(r['calib_D'])} | "
                     f"{fmt(r['heldout_D'])} | {fmt(r['cosine'])} | {fmt(r['null_norm'])} | {fmt(r['seconds'], '{:.1f}')} | "
                     f"{fmt(r['heal_seconds'], '{:.1f}')} | {fmt(r['heal_share'], '{:.1%}')} | {r['note']} |")
    lines += [""] + [f"- {n}" for n in notes]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
