# Set-up and everyday commands. `make demo` and `make test` are all a fresh machine needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian tools the optional parts call: Opus and Codec 2 for evaluation, ffmpeg for the corpus recipe,
# Chromium and its WebDriver for the listening page's browser test.
APT_PACKAGES := ffmpeg opus-tools codec2 espeak-ng chromium chromium-driver

.PHONY: install demo test system-deps corpus golden

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # first, so nothing pulls another torch build
	$(PY) -m pip install -q -e ".[all]"
	touch $@

install: $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: optional tools missing ($$missing): their tests are skipped; install with apt-get"; fi; \
	fi

demo: install
	$(VENV)/bin/simvq-codec compress examples/speech.wav speech.tok --force
	$(VENV)/bin/simvq-codec info speech.tok
	$(VENV)/bin/simvq-codec decompress speech.tok speech.restored.wav --force
	@echo "restored audio: speech.restored.wav"

test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

corpus: install system-deps
	$(PY) -m training.corpus --out data/corpus --sources default fotaq drascula --install

# After a deliberate new export of the default model: re-pin its hash and the reference recording's tokens.
golden: install
	$(PY) -m tests.test_golden --update
