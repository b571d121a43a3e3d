# Store and results verbs (docs/storage-and-results.md). Each prints what it does.
#
#   make store-up                      local S3 store: SeaweedFS on 127.0.0.1, data in .store/
#   make store-down                    stop it
#   make results                       pull every complete run from RESULTS_URI into results/,
#                                      then print the table and write results/plot.png
#   make results RUN_ID=<id>           only that run
#   make results RESULTS_URI=s3://my-bucket/runs   any store (credentials from the AWS chain)

LOCAL_RESULTS_URI := s3://pgolf-results/runs
RESULTS_URI ?= $(LOCAL_RESULTS_URI)
RESULTS_DIR ?= results
RUN_ID ?=

.PHONY: store-up store-down results

store-up: venv ## start the local S3 store (SeaweedFS weed mini, 127.0.0.1, data in .store/)
	@echo ">> starting the local SeaweedFS store in .store/ (stays up in the background)"
	$(PGOLF) store up

store-down: venv ## stop the local S3 store
	@echo ">> stopping the local SeaweedFS store"
	$(PGOLF) store down

results: venv ## pull runs from RESULTS_URI into results/, print the table and the plot path
	@echo ">> pulling $(or $(RUN_ID),every complete run) from $(RESULTS_URI) into $(RESULTS_DIR)/"
	@set -e; \
	if [ "$(RESULTS_URI)" = "$(LOCAL_RESULTS_URI)" ]; then \
	  lines="$$($(PGOLF) store env)" || { echo "start it first: make store-up"; exit 2; }; \
	  eval "$$lines"; \
	fi; \
	pulled=0; \
	$(PGOLF) results pull $(if $(RUN_ID),$(RUN_ID),--all) --from "$(RESULTS_URI)" --to "$(RESULTS_DIR)" \
	  || pulled=$$?; \
	echo ">> runs in $(RESULTS_DIR)/"; \
	$(PGOLF) results ls --dir "$(RESULTS_DIR)"; \
	echo ">> plotting train loss and val_bpb"; \
	$(PGOLF) results plot $(RUN_ID) --dir "$(RESULTS_DIR)" --out "$(RESULTS_DIR)/plot.png" \
	  || echo "(no plot: no train/val events in metrics.jsonl yet)"; \
	exit $$pulled  # a run that could not be pulled fails the target, after the table
