import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

# Under xdist (`make test`: -n 2 on 2 cores) each worker's default torch/OpenMP pool (one thread a core) would
# oversubscribe the cores: OpenMP barriers then spin against the other worker, and a search test that does many
# small forwards runs ~15x slower (measured: 165 s against 10.6 s). One intra-op thread per worker, also for the
# subprocesses (CLI runs) the tests start; a plain serial `pytest` keeps torch's default.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

SHARED_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"

# `make fuzz` (HYPOTHESIS_PROFILE=fuzz): every hypothesis test runs at least SKRR_FUZZ_EXAMPLES examples (1,000),
# whatever its own @settings say; CI keeps each test's own, fast, example count.
FUZZ_EXAMPLES = int(os.environ.get("SKRR_FUZZ_EXAMPLES", "1000"))


def pytest_configure(config):
    from hypothesis import HealthCheck, settings

    if XDIST_WORKER:  # torch may have been imported (by a plugin) before the variables above were set
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=None,
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz":
        settings.load_profile("fuzz")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HYPOTHESIS_PROFILE") != "fuzz":
        return
    from hypothesis import settings

    done = set()
    for item in items:
        fn = getattr(item, "obj", None)
        if getattr(fn, "hypothesis", None) is None or id(fn) in done:
            continue
        done.add(id(fn))
        current = getattr(fn, "_hypothesis_internal_use_settings", None) or settings.default
        fn._hypothesis_internal_use_settings = settings(
            current, max_examples=max(current.max_examples, FUZZ_EXAMPLES), deadline=None,
            suppress_health_check=[*current.suppress_health_check, *settings.get_profile("fuzz").suppress_health_check],
        )
