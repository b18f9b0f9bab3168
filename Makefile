# Every target creates .venv and installs what it needs first (exact versions from
# requirements/constraints.txt), so a fresh clone needs nothing but python3 >= 3.11.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The machine's PostgreSQL for the second test pass; the first pass uses the embedded pgserver.
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
PYTEST_ARGS ?=

.PHONY: run test venv lint typecheck protos check-protos test-embedded test-external tools migration clean bench bench-quick chaos chaos-quick release-contract

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[dev,onnx]'
	touch $@

venv: $(VENV)/.installed

## make run: start the control service and one discovery worker on the embedded PostgreSQL.
run: venv
	$(PY) -m imagetraining.devrun

## make test: lint, type check, contract lint, then the whole suite on both databases.
test: venv tools lint typecheck test-embedded test-external

# docker-compose (Debian's package) validates compose.yaml without an engine; installed when missing
# and possible (root with apt-get), otherwise that one test is skipped with a reason.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing docker-compose with apt-get (used only to validate compose.yaml in one test)"; \
	    (apt-get install -y -qq docker-compose >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq docker-compose >/dev/null 2>&1)) || \
	    echo "note: could not install docker-compose; the compose test will be skipped"; \
	  fi; }

# The released contract: one buf image per package version (protos/released/imagetraining-vN.binpb),
# committed, so that `buf breaking` needs no git history (CI's clone may be shallow).
CONTRACT_IMAGES = $(wildcard protos/released/*.binpb)
CONTRACT_BROKEN = echo "the contract change above breaks clients of the released contract: make it compatible, or \
start a new package version (README.md, \"Changing the contract\")" >&2

## make lint: style, buf lint, and buf breaking against every released contract image.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	@test -n "$(CONTRACT_IMAGES)" || { echo "no released contract in protos/released: run make release-contract" >&2; exit 1; }
	@for image in $(CONTRACT_IMAGES); do \
	  echo "$(BIN)/buf breaking --against $$image"; \
	  $(BIN)/buf breaking --against "$$image" || { $(CONTRACT_BROKEN); exit 1; }; \
	done

## make release-contract: when a release is cut, record its contract (one image per package version
## under protos/imagetraining/) in protos/released/ and commit the images with the release. Refuses
## a contract that breaks a released one.
release-contract: venv
	@for image in $(CONTRACT_IMAGES); do \
	  $(BIN)/buf breaking --against "$$image" || { $(CONTRACT_BROKEN); exit 1; }; \
	done
	@mkdir -p protos/released
	@for dir in protos/imagetraining/v*/; do \
	  version=$$(basename "$$dir"); \
	  $(BIN)/buf build --exclude-source-info --path "$$dir" -o "protos/released/imagetraining-$$version.binpb" || exit 1; \
	  echo "wrote protos/released/imagetraining-$$version.binpb (commit it with the release)"; \
	done

typecheck: venv
	$(BIN)/mypy imagetraining control_service discovery_worker

test-embedded: venv
	env -u IMAGETRAINING_TEST_DATABASE_URL $(BIN)/pytest $(PYTEST_ARGS)

test-external: venv
	@if $(PY) -c "import asyncio, asyncpg, sys; asyncio.run(asyncpg.connect('$(TEST_DATABASE_URL)', timeout=3))" 2>/dev/null; then \
	  IMAGETRAINING_TEST_DATABASE_URL='$(TEST_DATABASE_URL)' $(BIN)/pytest $(PYTEST_ARGS); \
	elif [ -n "$$CI" ]; then echo "CI: PostgreSQL at $(TEST_DATABASE_URL) is not reachable" >&2; exit 1; \
	else echo "skipping the external-PostgreSQL pass: $(TEST_DATABASE_URL) is not reachable (set TEST_DATABASE_URL)"; fi

## make bench: the performance cases of issue #5 (docs/performance.md); BENCH_ARGS="--cases 1,3" for a subset.
bench: venv
	$(PY) -m benchmarks $(BENCH_ARGS)

## make bench-quick: the same cases at smaller sizes, under 2 minutes (a smoke run: figures printed, never asserted).
bench-quick: venv
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

## make chaos: faults injected at random (kill -9, SIGSTOP, PostgreSQL and control restarts, the library
## renamed away) into a real cluster training 10,000 images, 3 rounds, every result checked (tests/chaos.py).
chaos: venv
	GRPC_VERBOSITY=ERROR $(PY) -m tests.chaos $(CHAOS_ARGS)

## make chaos-quick: one round (a few minutes; CI runs it).
chaos-quick: venv
	GRPC_VERBOSITY=ERROR $(PY) -m tests.chaos --quick $(CHAOS_ARGS)

## make protos: regenerate imagetraining/v1 from protos/ (commit the result).
protos: venv
	$(PY) scripts/gen_protos.py

## make migration MSG="...": autogenerate an Alembic revision (DATABASE_URL: a scratch database).
migration: venv
	$(PY) scripts/new_migration.py $(MSG)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
