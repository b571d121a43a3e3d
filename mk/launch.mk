# Cloud launch verbs: the Docker image and SkyPilot tasks (sky/*.yaml). Each prints what it does.
# Details and a from-zero walkthrough: docs/launch.md.
#
#   make launch SEED=1337 IMAGE=ghcr.io/you/pgolf:TAG   one record attempt on 8 x H100 SXM
#   make launch SEED=1337 PRESET=frontier               the same with another preset (and its data)
#   make seeds SEEDS="1337 42 2025"                      three seeds, one cluster
#   make status | logs | down                            watch it, tear it down (always works)
#   make stage-data DATA_URI=s3://bucket/data            copy FineWeb from HF to your bucket once
#   make image IMAGE=... && make push IMAGE=...          build and publish the pinned image

SKY ?= $(if $(wildcard $(VENV)/bin/sky),$(VENV)/bin/sky,sky)
DOCKER ?= docker
TASK ?= sky/record.yaml
SEED ?= 1337
PRESET ?=
SEEDS ?= 1337 42 2025
# Cluster names come from your user name and the (first) seed: pgolf-<user>-s<seed>.
CLUSTER_USER := $(shell id -un 2>/dev/null | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$$//g')
CLUSTER ?= pgolf-$(or $(CLUSTER_USER),user)-s$(SEED)
SEEDS_CLUSTER ?= pgolf-$(or $(CLUSTER_USER),user)-s$(firstword $(SEEDS))
DATA_CLUSTER ?= pgolf-$(or $(CLUSTER_USER),user)-data
IDLE ?= 10
IMAGE ?=
# `make push` records "<image> <digest>" lines here; a launch of the same IMAGE records the digest.
IMAGE_DIGEST_FILE := .cache/pgolf-image-digests
IMAGE_DIGEST ?= $(if $(IMAGE),$(shell awk -v i="$(IMAGE)" '$$1 == i {d = $$2} END {print d}' $(IMAGE_DIGEST_FILE) 2>/dev/null))
LAUNCH_FLAGS ?=
FA3_LOCK := docker/fa3.lock
FA3_WHEEL_URL = $(shell sed -n 's/^FA3_WHEEL_URL=//p' $(FA3_LOCK))
FA3_WHEEL_SHA256 = $(shell sed -n 's/^FA3_WHEEL_SHA256=//p' $(FA3_LOCK))
IMAGE_FLAGS = $(if $(IMAGE),--image $(IMAGE)) $(if $(IMAGE_DIGEST),--image-digest $(IMAGE_DIGEST))
PRESET_FLAGS = $(if $(PRESET),--preset $(PRESET))

.PHONY: launch launch-dry seeds status logs down stage-data image push fa3-pin image-digests lock lint-docker

launch: venv ## launch one seed on 8 x H100 SXM (SEED=1337 IMAGE=... TASK=sky/record.yaml)
	@echo ">> launching $(TASK) with SEED=$(SEED) on cluster $(CLUSTER) (image: $(or $(IMAGE),the YAML's public image)); autostop+teardown after $(IDLE) idle min"
	$(PGOLF) launch $(TASK) --seed $(SEED) --cluster $(CLUSTER) $(IMAGE_FLAGS) $(PRESET_FLAGS) --idle-minutes $(IDLE) $(LAUNCH_FLAGS)

launch-dry: venv ## write ship/train_gpt.py, print it, the resolved task and the equivalent sky command, offline
	@echo ">> dry run of $(TASK) with SEED=$(SEED) on cluster $(CLUSTER): nothing is launched"
	$(PGOLF) launch $(TASK) --seed $(SEED) --cluster $(CLUSTER) $(IMAGE_FLAGS) $(PRESET_FLAGS) --idle-minutes $(IDLE) --dry-run $(LAUNCH_FLAGS)

seeds: venv ## run SEEDS="1337 42 2025" one after another on one cluster (launch, then sky exec)
	@echo ">> running seeds $(SEEDS) of $(TASK) on cluster $(SEEDS_CLUSTER): the first launches it, the others reuse it"
	$(PGOLF) launch $(TASK) --seeds $(SEEDS) --cluster $(SEEDS_CLUSTER) $(IMAGE_FLAGS) $(PRESET_FLAGS) --idle-minutes $(IDLE) $(LAUNCH_FLAGS)

status: venv ## list your SkyPilot clusters
	@echo ">> sky status (all your clusters; $(CLUSTER) is SEED=$(SEED)'s)"
	$(SKY) status

logs: venv ## stream the latest job's logs of CLUSTER
	@echo ">> streaming logs of cluster $(CLUSTER)"
	$(SKY) logs $(CLUSTER)

down: venv ## tear CLUSTER down now (works even when setup failed and --down did not fire)
	@echo ">> tearing down cluster $(CLUSTER) (billing stops when this returns)"
	$(SKY) down -y $(CLUSTER)

stage-data: venv ## copy FineWeb shards + tokenizer from Hugging Face into DATA_URI (CPU machine)
	@test -n "$(DATA_URI)" || { echo "set DATA_URI=s3://your-bucket/data"; exit 2; }
	@echo ">> staging FineWeb into $(DATA_URI) with sky/data.yaml on cluster $(DATA_CLUSTER) (CPU only)"
	$(PGOLF) launch sky/data.yaml --cluster $(DATA_CLUSTER) --data-uri $(DATA_URI) --idle-minutes $(IDLE) $(LAUNCH_FLAGS)

image: ## build docker/Dockerfile as IMAGE (pins the FA3 wheel first if needed)
	@test -n "$(IMAGE)" || { echo "set IMAGE=registry/name:tag, e.g. ghcr.io/you/pgolf:cu128-torch2.9.1-fa3-$$(git rev-parse --short HEAD)"; exit 2; }
	@test -n "$(FA3_WHEEL_SHA256)" || $(MAKE) --no-print-directory fa3-pin
	@echo ">> building $(IMAGE) from docker/Dockerfile (torch 2.9.1+cu128, FA3 $(FA3_WHEEL_SHA256))"
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE) \
	  --build-arg FA3_WHEEL_URL=$(FA3_WHEEL_URL) --build-arg FA3_WHEEL_SHA256=$(FA3_WHEEL_SHA256) \
	  --build-arg PGOLF_GIT_SHA=$$(git rev-parse HEAD 2>/dev/null || echo unknown) .

push: ## push IMAGE and record its digest for later launches
	@test -n "$(IMAGE)" || { echo "set IMAGE=registry/name:tag"; exit 2; }
	@echo ">> pushing $(IMAGE) and recording its digest in $(IMAGE_DIGEST_FILE)"
	$(DOCKER) push $(IMAGE)
	@mkdir -p $(dir $(IMAGE_DIGEST_FILE))
	digest=$$($(DOCKER) inspect --format='{{index .RepoDigests 0}}' $(IMAGE) | sed 's/.*@//'); \
	  echo "$(IMAGE) $$digest" >> $(IMAGE_DIGEST_FILE); \
	  echo ">> pushed $(IMAGE) @ $$digest; now: make launch IMAGE=$(IMAGE)"

fa3-pin: venv ## download the FA3 wheel once and record its URL + sha256 in docker/fa3.lock
	@echo ">> resolving the FA3 wheel from the index in $(FA3_LOCK) and pinning its sha256 there"
	$(VPY) docker/pin_fa3.py $(FA3_LOCK)

image-digests: ## re-resolve the Dockerfile's and YAMLs' base image tags and show their digests
	@echo ">> resolving base image digests with docker buildx imagetools (compare with docker/Dockerfile, sky/*.yaml)"
	@for ref in nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
	  pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime; do \
	  digest=$$($(DOCKER) buildx imagetools inspect $$ref --format '{{json .Manifest.Digest}}' | tr -d '"'); \
	  if grep -q "$$ref@$$digest" docker/Dockerfile sky/*.yaml; then echo "ok     $$ref@$$digest"; \
	  else echo "DRIFT  $$ref is now $$digest (update the pin after checking the image)"; fi; \
	done

lock: venv ## re-resolve docker/requirements.in into the hash-pinned docker/requirements.lock
	@echo ">> resolving docker/requirements.in for linux x86_64 / CPython 3.12 into docker/requirements.lock"
	$(VPY) -m pip install --isolated --index-url https://pypi.org/simple --dry-run --ignore-installed \
	  --only-binary=:all: --python-version 3.12 --implementation cp --target .cache/lock-target \
	  $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64,--platform $(p)) \
	  --report .cache/lock-report.json -r docker/requirements.in
	$(VPY) docker/make_lock.py .cache/lock-report.json > docker/requirements.lock

lint-docker: venv ## hadolint the Dockerfile, shellcheck the node scripts
	@echo ">> hadolint docker/Dockerfile; shellcheck sky/node.sh docker/fetch-fa3.sh"
	$(VENV)/bin/hadolint --config docker/.hadolint.yaml docker/Dockerfile
	$(VENV)/bin/shellcheck sky/node.sh docker/fetch-fa3.sh
