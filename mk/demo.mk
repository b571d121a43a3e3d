# The main job at CPU size (the README's fresh-machine command). Prints what it does at each step.
#
#   make demo                    offline corpus -> local S3 -> pgolf run --preset tiny (SEED=1337)
#   make demo RESULTS_URI=file:///tmp/pgolf-results     sync somewhere else instead
#   make demo DEMO_PRESET=debug                          seconds instead of minutes
#   make demo DEMO_PRESET=frontier-tiny                  the frontier stack on CaseOps text (data/offline-caseops)

DEMO_PRESET ?= tiny
DEMO_SEED ?= 1337
# the frontier presets train on CaseOps text with a byte sidecar; the others on the plain corpus
DEMO_DATA = $(if $(filter frontier%,$(DEMO_PRESET)),data/offline-caseops,data/offline)

.PHONY: demo

demo: venv ## the whole pipeline on the CPU: tiny preset, offline corpus, synced to the local store
	@echo ">> building (or reusing) the offline corpus in $(DEMO_DATA)"
	$(PGOLF) data offline --out $(DEMO_DATA) $(if $(filter frontier%,$(DEMO_PRESET)),--caseops)
	@set -e; \
	if [ "$(RESULTS_URI)" = "$(LOCAL_RESULTS_URI)" ]; then \
	  echo ">> starting the local SeaweedFS store (.store/) for $(RESULTS_URI)"; \
	  $(PGOLF) store up; \
	  eval "$$($(PGOLF) store env)"; \
	fi; \
	echo ">> pgolf run --preset $(DEMO_PRESET) with SEED=$(DEMO_SEED), syncing to $(RESULTS_URI)"; \
	SEED=$(DEMO_SEED) RESULTS_URI="$(RESULTS_URI)" $(PGOLF) run --preset $(DEMO_PRESET)
	@echo ">> done: 'make results' pulls it into results/ and prints the table"
