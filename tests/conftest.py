import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

SHARED_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"

# `make fuzz` (HYPOTHESIS_PROFILE=fuzz): every hypothesis test runs at least SKRR_FUZZ_EXAMPLES examples (1,000),
# whatever its own @settings say; CI keeps each test's own, fast, example count.
FUZZ_EXAMPLES = int(os.environ.get("SKRR_FUZZ_EXAMPLES", "1000"))


def pytest_configure(config):
    from hypothesis import HealthCheck, settings

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
