"""Runs skrr_compile.kernels under the Triton interpreter on cases saved by tests/test_kernels.py.

Usage: python kernels_interpret_worker.py CASES.pt RESULTS.pt

TRITON_INTERPRET=1 is set here, before the kernels are imported (Triton reads it when a kernel is
decorated), so it never leaks into the pytest process. SKRR_KERNELS=triton makes the wrappers' default
dispatch take the Triton path, which also checks the environment override end to end.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("SKRR_KERNELS", "triton")


def main(cases_path: str, results_path: str) -> None:
    import torch
    from skrr_compile.kernels import (
        ProjectionSpec,
        last_backend,
        masked_mse_sums,
        projected_mse_sums,
        select_backend,
    )
    from skrr_compile.kernels import masked_mse as masked_mse_module
    from skrr_compile.kernels import projected_mse as projected_mse_module

    cases = torch.load(cases_path)
    results: dict = {
        "_selected_backend": select_backend("cpu"),
        "_kernels": [
            type(masked_mse_module._masked_mse_partials_kernel).__name__,
            type(projected_mse_module._linear_kernel).__name__,
        ],
    }
    for name, case in cases.items():
        try:
            if case["op"] == "masked":
                sums, counts = masked_mse_sums(case["candidates"], case["reference"], case["mask"])
                backend = last_backend("masked_mse_sums")
            else:
                spec = ProjectionSpec(**case["projection"])
                sums, counts = projected_mse_sums(
                    case["candidates"], case["reference_projected"], case["mask"], spec
                )
                backend = last_backend("projected_mse_sums")
            results[name] = {"sums": sums, "counts": counts, "backend": backend}
        except Exception as error:  # reported by the test of this case
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
