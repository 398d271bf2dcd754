# The two commands a newcomer needs: `make demo` and `make test`. Both do all the set-up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SANDBOX_DIR ?= .sandbox/demo

.PHONY: setup demo test lint format bench mutate infra deploy clean

setup: $(STAMP)

# Editable in compat mode: a plain path in a .pth, not an import hook, so every driver process starts
# ~10 ms faster (the driver runs once per CI stage).
$(STAMP): pyproject.toml requirements.txt scripts/setup-system.sh
	./scripts/setup-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' -r requirements.txt --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sandbox demo --dir $(SANDBOX_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# A short, fresh base directory per run (not the shared /tmp/pytest-of-<user>, which another pytest session on
# the machine may prune mid-run): the agent tests' socket paths stay short and their directories stay put.
# Three workers, each taking whole files (a file's sandbox and its tests' order stay together): the e2e tier
# mostly waits (provisioning delays, watchdogs, heartbeat timeouts), so 2 CPUs serve three of them.
test: lint
	base=$$(mktemp -d /tmp/fci-test-XXXXXX) && $(PY) -m pytest -q -n 3 --dist loadfile --basetemp=$$base

bench: $(STAMP)
	$(PY) -m bench

# On demand: mutmut mutates chalicelib/ and the driver's ssh, exit_status and prepare in a copy (mutants/),
# runs the unit and API tiers against each mutant, then prints the score per module.
mutate: $(STAMP)
	$(PY) -m pip install -q -e '.[mutate]' --config-settings editable_mode=compat
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 > mutants.log 2>&1 || (tail -20 mutants.log; exit 1)
	$(PY) scripts/mutation_score.py

infra: $(STAMP)
	$(PY) -m infra.generate

# Deploy or upgrade a stage in one command (infra/deploy.py; the operator's guide, "Deploy to AWS"):
#   make deploy STAGE=prod IMAGE=<account>.dkr.ecr.<region>.amazonaws.com/fargate-ci:<tag> \
#       [BUILD=1] [DRY_RUN=1] [REGION=eu-west-1] [BUCKET=...] [PARAMS="VpcId=vpc-1 TaskSubnets=subnet-a,subnet-b"]
# It prints the driver's [Orchestrator] URL and the runner manager's policy ARN. DRY_RUN=1: no AWS call.
deploy: $(STAMP)
	@test -n "$(STAGE)" -a -n "$(IMAGE)" || { echo "usage: make deploy STAGE=<stage> IMAGE=<image uri> [BUILD=1] [DRY_RUN=1] [PARAMS=...]" >&2; exit 2; }
	$(PY) -m infra.deploy --stage "$(STAGE)" --image "$(IMAGE)" $(if $(BUILD),--build) $(if $(DRY_RUN),--dry-run) \
		$(if $(REGION),--region "$(REGION)") $(if $(BUCKET),--bucket "$(BUCKET)") $(if $(OUT),--out "$(OUT)") \
		$(foreach p,$(PARAMS),--parameter '$(p)')

clean:
	rm -rf $(VENV) .sandbox .pytest_cache .ruff_cache build mutants mutants.log
