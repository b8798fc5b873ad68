# Set-up and the two everyday commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a local wheel on this project's machines). On an NVIDIA machine use
# `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"` instead.
TORCH ?= torch==2.13.0
# CLIP's tokenizer vocabulary for single-file checkpoints (vlrt/model/clip_vocab.py): only its data file
# is read, so its dependencies (torchvision, timm) are not installed.
CLIP_VOCAB ?= open_clip_torch==3.3.0
# ControlNet's annotator modules (the extra vlrt[annotators]) without the torchvision and timm that
# controlnet_aux requires (they would replace torch): lineart, hed, pidinet and mlsd need neither.
ANNOTATORS ?= controlnet_aux==0.0.10 einops==0.8.2
DEMO_DIR := demo_out

.PHONY: setup demo test bench clean

setup: $(BIN)/vlrt

$(BIN)/vlrt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,ray,ui]"
	$(BIN)/pip install -q --no-deps "$(CLIP_VOCAB)"
	$(BIN)/pip install -q --no-deps $(ANNOTATORS)
	touch $(BIN)/vlrt

demo: setup
	mkdir -p $(DEMO_DIR)
	$(BIN)/python -m vlrt.demo.clip $(DEMO_DIR)/sample.mp4
	$(BIN)/vlrt render $(DEMO_DIR)/sample.mp4 -o $(DEMO_DIR)/out.mp4 --model demo --config presets/demo.toml \
		--preview $(DEMO_DIR)/preview.png
	@echo "demo: wrote $(DEMO_DIR)/out.mp4 and $(DEMO_DIR)/preview.png"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/vlrt bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
