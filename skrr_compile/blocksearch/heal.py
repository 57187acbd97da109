"""Healing: one d x d map per run of skipped sub-blocks, fitted on calibration activations, merged into kept weights.

For each maximal run a..e of consecutive skipped sub-blocks that re-use does not cover, k = a - 1 is the last
kept sub-block before it; f is the output of k's output projection (passes/heal.py), h_in = s_k its residual
input and h_out the dense model's stream after the run (s_{e+1}). Least squares (ReplaceMe's recipe at
sub-block granularity): T = argmin ||f T - (h_out - h_in)||^2 + alpha ||T||^2, with f^T f and f^T (h_out - h_in)
accumulated in float64 over the read tokens of every calibration chunk and of the null prompt (memory: d^2 per
run, not per prompt). Runs are fitted in order, each on the pruned model healed so far (its h_in and f) against
the dense h_out, so errors do not accumulate. The map is merged (W <- T^T W, b <- T^T b) and kept only if it
lowers the calibration discrepancy D; otherwise the run stays unhealed and the report says why.

Post-LN (BERT): k's add is followed by a LayerNorm, and every skipped sub-block of the run keeps its own, so
the stream after the run is LN_e(...LN_k(h_in + f T)). The lstsq target is the pre-image of h_out under that
chain of LayerNorms, each norm's lost per-token mean and scale taken from the pruned model's own values
(`passes.heal.invert_norms`); `cosine` then takes gradient steps through the true chain. Method `cosine`:
Adam steps on 1 - cos(stream after the run, h_out) over a token sample, from the lstsq solution; the best
(lowest-loss) map is kept.

Sandwich norms (Gemma-2/3): k's add reads N(f) = f * rsqrt(mean(f^2) + eps) * g, so the stream after the run
is h_in + N(f T). N is scale-invariant: the fit targets its pre-image at f's own scale, f T ~ (h_out - h_in) / g
* rms(f), with the gain g recovered per channel from f and N(f) (checked to reproduce N(f), else the run is
left unhealed); `cosine` descends through N itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.runner import Config
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.plan import Plan
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.passes.graph_utils import fetch_attr
from skrr_compile.passes.heal import (
    HealUnsupported,
    OutputProjection,
    apply_norms,
    invert_norms,
    merge_map,
    output_projection,
    post_norms,
)

FALLBACK_RIDGE = 1e-2  # relative ridge when there are fewer calibration tokens than channels
CV_FOLDS = 4  # ridge "auto": folds of calibration prompts (prompt p of chunk c is in fold (c + p) mod 4)
RIDGE_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 3))  # 1e-6 .. 10, half decades, relative to mean diag


@dataclass
class Run:
    blocks: tuple[int, ...]  # consecutive skipped sub-blocks (not re-used)
    kept: int | None  # the kept sub-block before them, whose output projection carries the map
    projection: OutputProjection | None = None  # the projection's weights (re-use: the owner's), f's node at `kept`
    norms: tuple = ()  # post-LN: the norms on the stream from k's add to the end of the run, in order
    reason: str | None = None  # why this run cannot be healed
    owner: int | None = None  # the sub-block whose weights `kept` executes (itself, or the one it re-uses)

    @property
    def label(self) -> str:
        a, e = self.blocks[0], self.blocks[-1]
        return f"{a}" if a == e else f"{a}-{e}"


@dataclass
class Site:
    """One position that executes a (shared) output projection: f T must approximate y there."""

    kept: int  # the position (its stage computes f)
    node: str  # f's node in that stage
    end: int | None  # the run's last skipped sub-block; None: no run follows (the map should leave f as it is)
    norms: tuple = ()
    post_norm: str | None = None  # sandwich norm: the node of norm(f), what the stream adds
    eps: float = 0.0


def find_runs(graph: EncoderGraph, plan: Plan) -> list[Run]:
    """The maximal runs of skipped, not re-used sub-blocks, each with its kept projection or a refusal.
    A kept sub-block whose projection is shared through re-use (it re-uses another's weights, or others re-use
    its weights) still carries the map: the map is fitted jointly over every position executing those weights
    (`sites`)."""
    reuse = dict(plan.reuse)
    plain = sorted(i for i in plan.skip if i not in reuse)
    groups: list[list[int]] = []
    for i in plain:
        if groups and groups[-1][-1] == i - 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    gm, blocks = graph.graph_module, graph.blocks
    runs = []
    for g in groups:
        k = g[0] - 1
        run = Run(tuple(g), k if k >= 0 else None)
        if k < 0:
            run.reason = "the run starts at sub-block 0: there is no kept sub-block before it to carry a map"
        else:
            owner = reuse.get(k, k)
            try:
                own = output_projection(gm, blocks[owner])
                at_k = output_projection(gm, blocks[k])
                run.projection = OutputProjection(k, at_k.node, own.weight, own.bias, own.layout, at_k.post_norm,
                                                  at_k.post_norm_eps)
                run.owner = owner
                run.norms = tuple(n for j in range(k, g[-1] + 1) for n in post_norms(gm, blocks[j]))
                if run.norms and at_k.post_norm:
                    run.reason = (f"sub-block {k} has both a norm after its output projection and a post-LN norm on "
                                  "the stream: not healed")
            except HealUnsupported as e:
                run.reason = str(e)
        runs.append(run)
    return runs


def sites_of(graph: EncoderGraph, plan: Plan, runs: list[Run]) -> list[Site]:
    """Every position executing the projection weights of `runs` (which share them): the runs' kept
    sub-blocks, and the other users of the weights (the owner if kept, sub-blocks re-using it) with no run after."""
    gm, blocks, reuse = graph.graph_module, graph.blocks, dict(plan.reuse)
    owner = runs[0].owner
    sites = [Site(r.kept, r.projection.node, r.blocks[-1], r.norms, r.projection.post_norm, r.projection.post_norm_eps)
             for r in runs]
    taken = {r.kept for r in runs}
    users = ([owner] if owner not in plan.skip else []) + sorted(i for i, j in reuse.items() if j == owner)
    for p in users:
        if p not in taken:
            sites.append(Site(p, output_projection(gm, blocks[p]).node, None))
    return sorted(sites, key=lambda x: x.kept)


# --- statistics over the calibration stream --------------------------------------------------------------
@dataclass
class _Stats:
    A: torch.Tensor  # f^T f (float64)
    B: torch.Tensor  # f^T y, y = target - h_in (float64)
    yy: float  # ||y||^2
    n: int  # tokens
    sample: list  # (f, h_in, h_out) float32 token rows kept for gradient steps
    gain: torch.Tensor | None = None  # sandwich norm (one site): its per-channel gain, recovered from f and norm(f)
    folds: list | None = None  # (A, B, yy, n) of each fold of prompts (one fold unless the ridge is "auto")


def _tensor(runner, name: str, current: dict) -> torch.Tensor:
    return (current[name] if name in current else fetch_attr(runner.gm, name)).detach()


@torch.no_grad()
def _collect(ev: Evaluator, config: Config, sites: list[Site], current: dict, keep_tokens: int,
             folds: int = 1) -> _Stats:
    """f^T f and f^T y summed over the read tokens of every chunk and every site (y = f where no run follows),
    per fold of prompts (`folds` > 1: for the cross-validated ridge) and in total."""
    r = ev.runner
    last_k = max(x.kept for x in sites)
    last_e = max([x.end for x in sites if x.end is not None] + [last_k])
    kept_tokens, sample, last_gain, device = 0, [], None, None
    fold_sums = [[0, 0, 0.0, 0] for _ in range(folds)]  # A, B, ||y||^2, tokens; 0 until a fold has tokens
    norm_tensors = {t: _tensor(r, t, current) for x in sites for nm in x.norms for t in (nm.weight, nm.bias) if t}
    # stages before the first one the configuration (or a merged weight) changes are shared by both models
    changed = [j for j in range(r.num_blocks) if config.mode(j) != "keep"]
    merged_blocks = [b.index for b in r.graph.blocks if any(p in current for p in b.params)]
    common = min(changed + merged_blocks + [min(x.kept for x in sites)])
    ends = {x.end + 1 for x in sites if x.end is not None}
    # every chunk this rank holds: all of them when ranks split candidates (each rank adds the statistics in
    # one process's order: the same floats), its shard when they split chunks (added across ranks below)
    for c in ev.chunks:
        ctx = ev.context(c)
        mask = ev.disc.null_mask if c < 0 else ev.disc.masks[c]
        h = ctx["s0"]
        for j in range(common):
            h = r.stage(j, h, ctx, "keep")
        dense, dense_at = h, {}
        for j in range(common, last_e + 1):
            dense = r.stage(j, dense, ctx, "keep")
            if j + 1 in ends:
                dense_at[j + 1] = dense[mask].double()
        del dense
        cap, h_at = {n: None for x in sites for n in (x.node, x.post_norm) if n}, {}
        with r.overridden(current):
            for j in range(common, last_k + 1):
                h_at[j] = h
                h = r.stage(j, h, ctx, config.mode(j), capture=cap)
        del h
        for x in sites:
            f = cap[x.node]
            if f is None or f.shape != h_at[x.kept].shape:
                raise SearchError(f"healing: the output projection of sub-block {x.kept} did not give a [batch, "
                                  f"tokens, d] value (got {None if f is None else tuple(f.shape)})")
            F, Hin = f[mask].double(), h_at[x.kept][mask].double()
            if x.end is None:  # another user of the shared weights: the map should leave its f unchanged
                Y, Hout = F, None
            elif x.post_norm:  # the stream adds norm(f T): fit f T to the pre-image of h_out - h_in at f's scale
                Hout = dense_at[x.end + 1]
                scale = torch.rsqrt(F.pow(2).mean(-1, keepdim=True) + x.eps)
                gain = rms_gain(F * scale, cap[x.post_norm][mask], x.kept)
                live = gain.abs() > 1e-12 * gain.abs().max()  # a zero gain: norm(f) is 0 there whatever f is
                Y = torch.where(live, (Hout - Hin) / torch.where(live, gain, 1.0) / scale, F)
            else:
                Hout = dense_at[x.end + 1]
                if x.norms:  # post-LN: the target in the space before k's norm
                    inputs, v = [], Hin + F
                    for nm in x.norms:
                        inputs.append(v)
                        v = apply_norms(v, (nm,), norm_tensors)
                    target = invert_norms(Hout, inputs, x.norms, norm_tensors)
                else:
                    target = Hout
                Y = target - Hin
            device = F.device
            if folds > 1:  # each token's prompt's fold, the same on any number of ranks
                fold_of = (mask.nonzero()[:, 0] + ev.global_id[c]) % folds
            for k, acc in enumerate(fold_sums):
                Fk, Yk = (F, Y) if folds == 1 else (F[fold_of == k], Y[fold_of == k])
                acc[0], acc[1] = acc[0] + Fk.T @ Fk, acc[1] + Fk.T @ Yk
                acc[2] += float((Yk * Yk).sum())
                acc[3] += Fk.shape[0]
            if x.post_norm and x.end is not None:
                last_gain = gain
            if len(sites) == 1 and kept_tokens < keep_tokens:
                m = min(keep_tokens - kept_tokens, F.shape[0])
                sample.append((ev.global_id[c], F[:m].float(), Hin[:m].float(), Hout[:m].float()))
                kept_tokens += m
        del cap, h_at
    if ev.by_chunks:  # every rank's fold sums, added in rank order (float64: equal to rounding, not bit for bit)
        g = ev.group
        parts = g.gather_objects([[v.cpu() if isinstance(v, torch.Tensor) else v for v in acc] for acc in fold_sums])
        fold_sums = [[sum(p[k][i] for p in parts) for i in range(4)] for k in range(folds)]
        fold_sums = [[v.to(device) if isinstance(v, torch.Tensor) else v for v in acc] for acc in fold_sums]
        # the token sample of one process: the first keep_tokens tokens in global chunk order
        pieces = sorted((p for rank_sample in g.gather_objects([(x[0], *(t.cpu() for t in x[1:])) for x in sample])
                         for p in rank_sample), key=lambda p: p[0])
        sample, kept_tokens = [], 0
        for _, *rows in pieces:
            m = min(keep_tokens - kept_tokens, rows[0].shape[0])
            if m > 0:
                sample.append((None, *(t[:m].to(device) for t in rows)))
                kept_tokens += m
    sample = [x[1:] for x in sample]
    A, B = sum(a[0] for a in fold_sums), sum(a[1] for a in fold_sums)
    yy, n = sum(a[2] for a in fold_sums), sum(a[3] for a in fold_sums)
    return _Stats(A, B, yy, n, sample, last_gain, [tuple(a) for a in fold_sums])


class NotAnRMSNorm(Exception):
    """The norm between a projection and its residual add is not x * rsqrt(mean(x^2) + eps) * gain."""


def rms_gain(normalised: torch.Tensor, out: torch.Tensor, block: int) -> torch.Tensor:
    """The per-channel gain g (float64) with out = normalised * g, least squares per channel over the tokens,
    checked to reproduce `out` to its dtype's rounding (else NotAnRMSNorm: the run is left unhealed)."""
    tol = 1e-3 if out.dtype in (torch.float32, torch.float64) else 3e-2
    out = out.double()
    gain = (normalised * out).sum(0) / (normalised * normalised).sum(0).clamp_min(1e-300)
    err = float((normalised * gain - out).norm() / out.norm().clamp_min(1e-300))
    if not err <= tol:
        raise NotAnRMSNorm(f"the norm after sub-block {block}'s output projection is not an RMS norm with a "
                           f"per-channel gain (relative residual {err:.2g}): not healed")
    return gain


def cross_validated_ridge(folds: list, grid=RIDGE_GRID) -> tuple[float | None, dict]:
    """The relative ridge of `grid` with the lowest held-out fit error over the folds (each fold's error of the
    map fitted on the other folds), and {ridge: summed held-out error / summed ||y||^2}.

    Per fold one eigendecomposition of the training f^T f = Q diag(l) Q^T; with C = Q^T B_train,
    G = Q^T A_k Q and H = Q^T B_k, the map T = Q diag(1 / (l + a)) C has held-out error
    sum_ij D_i D_j G_ij (C C^T)_ij - 2 sum_i D_i (H o C)_i. + yy_k, so every ridge costs O(d^2).
    None where fewer than two folds hold tokens (nothing to validate on)."""
    A, B = sum(f[0] for f in folds), sum(f[1] for f in folds)  # a fold without tokens holds 0
    errors = torch.zeros(len(grid), dtype=torch.float64)
    total_yy = 0.0
    for Ak, Bk, yyk, nk in folds:
        if not nk:
            continue
        A_tr, B_tr = A - Ak, B - Bk
        scale = float(A_tr.diagonal().mean())
        if not scale > 0:
            continue
        lam, Q = torch.linalg.eigh(A_tr)
        C = Q.T @ B_tr
        P = ((Q.T @ Ak @ Q) * (C @ C.T)).cpu()
        q = ((Q.T @ Bk) * C).sum(1).cpu()
        lam = lam.clamp_min(0).cpu()
        for i, a in enumerate(grid):
            D = 1.0 / (lam + a * scale)
            errors[i] += float(D @ P @ D - 2 * (D * q).sum() + yyk)
        total_yy += yyk
    if total_yy <= 0 or sum(1 for f in folds if f[3]) < 2:
        return None, {}
    table = {a: float(e) / total_yy for a, e in zip(grid, errors)}
    return min(table, key=table.get), table


def solve(A: torch.Tensor, B: torch.Tensor, n: int, ridge: float, label: str = "") -> tuple[torch.Tensor, float, str | None]:
    """T = (A + alpha I)^-1 B with alpha = ridge x mean diag(A); (T, ridge used, warning line or None)."""
    d = A.shape[0]
    warning = None
    if n < d:
        used = max(ridge, FALLBACK_RIDGE)
        warning = (f"healing run {label}: {n} calibration tokens for a {d} x {d} map (an exact fit needs at least "
                   f"{d}); fitting with ridge {used:g}")
        ridge = used
    scale = float(A.diagonal().mean())
    if not scale > 0:
        raise SearchError(f"healing run {label}: the kept output projection is zero on every calibration token, "
                          "so the least-squares system is singular")
    M = A + (ridge * scale) * torch.eye(d, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        if ridge == 0:
            rank = int(torch.linalg.matrix_rank(A))
            raise SearchError(f"healing run {label}: the least-squares system is singular (rank {rank} of {d} over "
                              f"{n} tokens); pass heal_ridge > 0 (--heal-ridge)")
        return torch.linalg.lstsq(M, B).solution, ridge, warning
    return torch.cholesky_solve(B, L), ridge, warning


def fit_error(A, B, yy, T) -> float:
    """||f T - y||^2 / ||y||^2 from the accumulated statistics."""
    return float((torch.trace(T.T @ A @ T) - 2 * torch.trace(T.T @ B) + yy) / max(yy, 1e-300))


def _cosine_refine(T0: torch.Tensor, stats: _Stats, run: Run, norm_tensors: dict, steps: int, lr: float) -> torch.Tensor:
    """Adam steps on 1 - cos(stream after the run, dense h_out) over the token sample, from T0; the best map."""
    sandwich = run.projection.post_norm is not None
    gain = stats.gain.float() if sandwich else None
    eps = run.projection.post_norm_eps
    F = torch.cat([s[0] for s in stats.sample])
    Hin = torch.cat([s[1] for s in stats.sample])
    Hout = torch.cat([s[2] for s in stats.sample])
    tensors = {k: v.detach().float() for k, v in norm_tensors.items()}
    T = T0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)

    def loss_of(t):
        ft = F @ t
        if sandwich:  # the stream adds the RMS norm of f T
            ft = ft * torch.rsqrt(ft.pow(2).mean(-1, keepdim=True) + eps) * gain
        out = apply_norms(Hin + ft, run.norms, tensors) if run.norms else Hin + ft
        return (1 - torch.nn.functional.cosine_similarity(out, Hout, dim=-1)).mean()

    with torch.enable_grad():
        best, best_loss = T0.detach().float().clone(), float(loss_of(T0.detach().float()))
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(T)
            loss.backward()
            opt.step()
            with torch.no_grad():
                value = float(loss_of(T))
            if value < best_loss:
                best, best_loss = T.detach().clone(), value
    return best.double()


# --- the driver ---------------------------------------------------------------------------------------------
@torch.no_grad()
def heal_plan(graph: EncoderGraph, ev: Evaluator, plan: Plan, overrides: dict | None, heal_cfg, *,
              method: str | None = None, progress: bool = False, strict: bool = False) -> tuple[Plan, dict, dict]:
    """Heal `plan`: (healed plan, merged weights by name: the given `overrides` plus the healed projections,
    report). `strict`: no run that can be healed is an error (skrr.heal); else the report says so."""
    t0 = time.perf_counter()
    method = method or heal_cfg.heal or "lstsq"
    r = ev.runner
    config = Config(frozenset(plan.skip), tuple(sorted(plan.reuse.items())))
    runs = find_runs(graph, plan)
    if strict and not runs:
        raise SearchError(f"nothing to heal: the plan has no run of skipped sub-blocks outside re-use "
                          f"(skip={list(plan.skip)}, reuse={dict(plan.reuse)})")
    current = {k: v for k, v in (overrides or {}).items()}
    with r.overridden(current):
        before = ev.report(config).to_dict()
    best = before
    entries, warnings = [], []
    units: list[list[Run]] = []  # runs whose maps go into the same (re-use shared) weights are fitted jointly
    for run in runs:
        same = [u for u in units if u[0].reason is None and run.reason is None
                and u[0].projection.weight == run.projection.weight]
        if same:
            same[0].append(run)
        else:
            units.append([run])
    for unit in units:
        run = unit[0]
        if run.reason is not None:
            entries.append({"run": list(run.blocks), "kept": run.kept, "accepted": False, "reason": run.reason})
            continue
        p = run.projection
        sites = sites_of(graph, plan, unit)
        label = ", ".join(r.label for r in unit)
        auto = heal_cfg.heal_ridge == "auto"
        try:
            stats = _collect(ev, config, sites, current, heal_cfg.heal_tokens if (method == "cosine") else 0,
                             folds=CV_FOLDS if auto else 1)
        except NotAnRMSNorm as e:
            entries += [{"run": list(rr.blocks), "kept": rr.kept, "accepted": False, "reason": str(e)} for rr in unit]
            continue
        ridge, cv_note = heal_cfg.heal_ridge, None
        if auto:
            ridge, _ = cross_validated_ridge(stats.folds)
            if ridge is None:
                ridge = FALLBACK_RIDGE
                cv_note = (f"healing run {label}: the calibration prompts fill fewer than 2 of the {CV_FOLDS} folds, "
                           f"so the ridge cannot be cross-validated; fitting with ridge {ridge:g} (pass heal_ridge)")
        T, ridge, warning = solve(stats.A, stats.B, stats.n, ridge, label)
        for line in (cv_note, warning):
            if line:
                warnings.append(line)
                if progress:
                    print(line, flush=True)
        if method == "cosine" and heal_cfg.heal_steps and len(sites) == 1:  # shared weights: the lstsq map
            norm_tensors = {t: _tensor(r, t, current) for nm in run.norms for t in (nm.weight, nm.bias) if t}
            T = _cosine_refine(T, stats, run, norm_tensors, heal_cfg.heal_steps, heal_cfg.heal_lr)
        eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        w = _tensor(r, p.weight, current)
        b = _tensor(r, p.bias, current) if p.bias else None
        new_w, new_b = merge_map(w, b, T, p.layout)
        trial = {**current, p.weight: new_w, **({p.bias: new_b} if p.bias else {})}
        with r.overridden(trial):
            after = ev.report(config).to_dict()
        accepted = after["discrepancy"] < best["discrepancy"]
        common = dict(weight=p.weight, bias=p.bias, tokens=stats.n, ridge=ridge,
                      **({"ridge_choice": f"cross-validated over {CV_FOLDS} folds of prompts"} if auto and
                         cv_note is None else {}),
                      fit_error_before=fit_error(stats.A, stats.B, stats.yy, eye),
                      fit_error_after=fit_error(stats.A, stats.B, stats.yy, T),
                      discrepancy_before=best["discrepancy"], discrepancy_after=after["discrepancy"],
                      accepted=accepted)
        if len(sites) > 1:
            common["shared"] = (f"one map in sub-block {run.owner}'s weights, fitted jointly at sub-blocks "
                                f"{[x.kept for x in sites]} (the positions executing them)")
        if not accepted:
            common["reason"] = (f"the map does not lower the calibration discrepancy (D {best['discrepancy']:.6g} -> "
                                f"{after['discrepancy']:.6g}): the run is left unhealed")
        for rr in unit:
            entries.append({"run": list(rr.blocks), "kept": rr.kept, **common})
        if accepted:
            current, best = trial, after
        if progress:
            print(f"heal run {label} (into sub-block {run.owner}'s projection): D {common['discrepancy_before']:.6g} "
                  f"-> {common['discrepancy_after']:.6g} {'accepted' if accepted else 'rejected'}", flush=True)
    entries.sort(key=lambda e: e["run"][0])
    healed = [e for e in entries if e.get("accepted")]
    seen: set = set()
    healed_maps = [e for e in healed if not (e["weight"] in seen or seen.add(e["weight"]))]
    if strict and not healed:
        reasons = "; ".join(f"run {e['run']}: {e['reason']}" for e in entries)
        raise SearchError(f"no run of this plan could be healed ({reasons})")
    report = {"method": method, "ridge": heal_cfg.heal_ridge, "runs": entries, "healed_runs": len(healed),
              "discrepancy_before": before["discrepancy"], "discrepancy_after": best["discrepancy"],
              "calibration_report_before": before, "calibration_report": best, "warnings": warnings,
              "seconds": time.perf_counter() - t0}
    if not runs:
        report["note"] = "the plan has no run of skipped sub-blocks outside re-use: nothing to heal"
    if healed:
        heal_info = {"method": method, "ridge": heal_cfg.heal_ridge,
                     "runs": [{"run": e["run"], "kept": e["kept"], "weight": e["weight"], "bias": e["bias"]}
                              for e in healed_maps]}
        plan = replace(plan, info={**plan.info, "merged_params": sorted(current), "heal": heal_info})
    return plan, current, report


# --- ReplaceMe: a contiguous span of whole layers chosen by cosine distance -----------------------------------
def replaceme_span(graph: EncoderGraph, ev: Evaluator, target: int) -> tuple[list[int], dict]:
    """ReplaceMe's choice: the fewest whole layers n that reach `target`, at the start s >= 1 (a kept FFN
    before it carries the map) with the smallest mean cosine distance between the dense stream entering layer
    s and the one leaving layer s + n - 1, over the read tokens of the calibration chunks."""
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    memo: dict = {}
    n = next((m for m in range(1, n_layers) if removed_by_skip(graph, range(2, 2 + 2 * m), memo) >= target), None)
    if n is None or n_layers - n < 1:
        raise SearchError("replaceme: no span of whole layers after layer 0 reaches this sparsity")
    starts = list(range(1, n_layers - n + 1))
    parts = []
    for c in ev.owned:
        if c < 0:
            continue
        ctx, mask = ev.context(c), ev.disc.masks[c]
        h = ctx["s0"]
        layer_states = [h]
        for k in range(r.num_blocks):
            h = r.stage(k, h, ctx, "keep")
            if k % 2 == 1:
                layer_states.append(h)
        sums = []
        for s in starts:
            cos = torch.nn.functional.cosine_similarity(layer_states[s].double(), layer_states[s + n].double(), -1)
            sums.append(float((1 - cos)[mask].sum()))
        parts.append((ev.global_id[c], sums, int(mask.sum())))
        del layer_states
    total, count = [0.0] * len(starts), 0
    for _, sums, m in sorted(p for rank_parts in ev.group.gather_objects(parts) for p in rank_parts):
        total = [a + b for a, b in zip(total, sums)]
        count += m
    dist = [t / max(count, 1) for t in total]
    best = min(range(len(starts)), key=lambda i: (dist[i], starts[i]))
    s = starts[best]
    skip = list(range(2 * s, 2 * (s + n)))
    return skip, {"layers": n, "start": s, "distances": {str(st): d for st, d in zip(starts, dist)}}


def check_dense_matches(dense_tensors: dict, pruned_tensors: dict, merged: set) -> None:
    """One-line error when a pruned model's kept (not merged) weights are not the dense model's."""
    for name, t in pruned_tensors.items():
        if name in merged:
            continue
        if name not in dense_tensors:
            if not isinstance(t, torch.nn.Parameter):  # a constant the trace lifted (not a weight)
                continue
            raise SearchError(f"the dense model is not the one this model was pruned from: it has no parameter {name}")
        d = dense_tensors[name]
        if d.shape != t.shape or not torch.equal(d.detach().to(t.device, t.dtype), t.detach()):
            raise SearchError(f"the dense model is not the one this model was pruned from (parameter {name} "
                              "differs): pass the dense model it was healed against")


# --- the public verb ------------------------------------------------------------------------------------------
def heal(dense_model, pruned, calibration, method: str = "lstsq", *, tokenizer=None, projection=None,
         select=None, progress: bool = False, **options):
    """The healed PrunedEncoder of `pruned` (a PrunedEncoder from skrr.apply / skrr.load / materialize):
    one map per run of skipped sub-blocks, fitted against `dense_model` (the HF model it was pruned from, or
    its EncoderGraph from skrr.trace) on
    `calibration` (a Calibration, or prompts with `tokenizer`). `options`: the heal group of SearchConfig
    (`ridge=`/`heal_ridge=`, `steps=`, `lr=`, `tokens=`). The report is `healed.info["heal"]`."""
    from skrr_compile.blocksearch.calibration import Calibration, read_prompts, tokenize
    from skrr_compile.blocksearch.config import HealConfig
    from skrr_compile.blocksearch.discrepancy import last_hidden_state
    from skrr_compile.blocksearch.runner import StagedRunner
    from skrr_compile.core.encoder import apply
    from skrr_compile.core.trace import trace
    from skrr_compile.utils.tensors import named_tensors

    cfg = HealConfig(heal=method, **{(k if k.startswith("heal_") else f"heal_{k}"): v for k, v in options.items()})
    plan = pruned.plan
    if plan.info.get("heal"):
        raise SearchError("this model is already healed: heal the unhealed pruned model (skrr.apply of its plan "
                          "without the heal maps) instead")
    graph = dense_model if isinstance(dense_model, EncoderGraph) else trace(dense_model)
    plan.validate(graph.blocks, graph.fingerprint)
    merged_names = set(plan.info.get("merged_params") or ())
    tensors = named_tensors(pruned.graph_module)
    check_dense_matches(named_tensors(graph.graph_module), tensors, merged_names)
    if not isinstance(calibration, Calibration):
        if tokenizer is None:
            raise SearchError("heal needs a Calibration, or prompts and tokenizer=")
        calibration = tokenize(tokenizer, read_prompts(calibration))
    device = next(iter(graph.graph_module.parameters())).device
    calibration = calibration.to(device)
    select = select or last_hidden_state
    runner = StagedRunner(graph)
    ev = Evaluator(runner, calibration, projection, select, cache_bytes=0)
    overrides = {n: tensors[n] for n in merged_names}
    new_plan, merged, report = heal_plan(graph, ev, plan, overrides, cfg, method=method, progress=progress,
                                         strict=True)
    ev.disc.reference.close()
    healed = apply(graph, new_plan, merged=merged)
    healed.info["heal"] = {k: v for k, v in report.items() if k != "calibration_report_before"}
    return healed
