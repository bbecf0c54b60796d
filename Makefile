# Fresh machine: `make demo` installs and captions the example photos; `make test` installs and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/flickr8k
WORK ?= work/flickr8k

.PHONY: install axe test demo bench data features train scst clean wheel

install: $(VENV)/.installed

# Idempotent: reinstalls only when the pins or the package metadata change.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# axe-core from npm, pinned, for the browser test's WCAG audit (tests/test_browser.py reads it from $(AXE_DIR)).
# Without npm or the registry the audit is skipped, except under CI, where the test fails instead.
AXE_VERSION := 4.14.1
AXE_DIR := build/axe-core
axe: $(AXE_DIR)/.installed-$(AXE_VERSION)

$(AXE_DIR)/.installed-$(AXE_VERSION):
	@if command -v npm >/dev/null 2>&1 && rm -rf $(AXE_DIR) && npm install --prefix $(AXE_DIR) --no-save \
		--no-package-lock --no-audit --no-fund --loglevel=error axe-core@$(AXE_VERSION); then touch $@; \
	else echo "axe-core $(AXE_VERSION) not installed (needs npm): the browser accessibility audit will skip"; fi

test: install axe
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/captioner caption examples/

# The wheel (dist/captioner-*.whl): the shipped model goes in as a model folder, exported first (ONNX graphs
# checked against torch), so `pip install dist/captioner-*.whl` captions without torch.
wheel: install
	rm -f dist/captioner-*.whl
	$(PY) tools/build_wheel.py --out dist

# The full pipeline on Flickr8k (prepare -> features -> train -> evaluate).
data: install
	$(VENV)/bin/captioner prepare $(DATA) --out $(WORK)

features: data
	$(VENV)/bin/captioner features $(WORK)

# The shipped model's recipe: 15 cross-entropy epochs with concept input (22 min on 2 cores with native bf16),
train: features
	$(VENV)/bin/captioner train $(WORK) --out runs/flickr8k --config configs/flickr8k-concepts.toml

# then self-critical fine-tuning of its best checkpoint (12 epochs; 25 min on those 2 cores, minutes on a GPU).
scst: install
	$(VENV)/bin/captioner train $(WORK) --out runs/scst --init runs/flickr8k/best.safetensors --scst \
		--config configs/flickr8k-scst.toml

bench: install
	$(PY) benchmarks/truthfulness.py
	$(PY) benchmarks/features.py
	$(PY) benchmarks/decode_speed.py --int8
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) build *.egg-info
