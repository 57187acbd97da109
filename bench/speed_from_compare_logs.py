"""Naive vs fast sub-block evaluations of a compare's Skrr and FinerCut searches, from its log and rows.

The naive search follows the same trajectory as the fast one (tests/test_search*.py check identical plans), so
its evaluations are counted exactly from the log's per-step candidate counts: a candidate of step s skips s
sub-blocks and runs the other K - s on each of the n chunks. The fast count is the skip phase's (the
skrr-skip row for skrr, which is the same beam search).

    python bench/speed_from_compare_logs.py LOG[,LOG...] OUT_DIR [OUT_DIR ...]   (K = 60, n = 5: see below)
"""
import json
import re
import sys

K, n_chunks = 60, 5  # SmolLM2's 60 sub-blocks; 16 prompts in chunks of 4, + the null prompt
def searches(log):
    # the text between result lines belongs to the search that the next result line names
    parts = re.split(r"\n\s*([a-z-]+) @ (0\.\d+): ", log)
    out = []
    for i in range(1, len(parts), 3):
        body = parts[i - 1]
        steps = {}
        for s, c in re.findall(r"skip step (\d+): (\d+) candidates", body):
            steps[int(s)] = int(c)
        out.append((parts[i], float(parts[i + 1]), steps))
    return out
rows = {}
for d in sys.argv[2:]:
    for line in open(d + "/rows.jsonl"):
        r = json.loads(line)
        rows[(r["method"], r["target"])] = r
for logf in sys.argv[1].split(","):
    for method, target, steps in searches(open(logf).read()):
        if method not in ("skrr", "finercut") or (method, target) not in rows:
            continue
        naive = sum(c * (K - s) * n_chunks for s, c in steps.items())
        fast_skip = rows[("skrr-skip", target)]["block_evals"] if method == "skrr" else rows[(method, target)]["block_evals"]
        r = rows[(method, target)]
        print(f"{method:9s} @ {target}: {len(steps)} steps, {sum(steps.values())} candidates; skip phase: naive {naive:,} "
              f"vs fast {fast_skip:,} sub-block evals = {naive / fast_skip:.2f}x; search {r['seconds']:.0f} s")
