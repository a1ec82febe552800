# SPDX-License-Identifier: GPL-2.0
#
# mshv_root.ko, out of tree.
#
#   make [KDIR=/lib/modules/<ver>/build] [HVSIM=1]   build the module
#   make run      the main job: set up, build for Debian 12's 6.1 and 6.12,
#                 show what was built (later: boot the simulated root)
#   make check    set up and run the tests
#   make mutate [ONLY="id ..."] [KERNELS=all]   mutation testing of mshv/*.c
#                 (tests/mutations.yaml; slow, not part of check): writes
#                 docs/mutation-score.md, fails when a mutation is missed
#   make dist     tarball with the generated C, for hosts without Python
#   make headers_install INSTALL_HDR_PATH=DIR   install DIR/include/linux/mshv.h

KDIR ?= /lib/modules/$(shell uname -r)/build
PYTHON ?= python3
VENV ?= .venv
VERSION := $(shell git describe --always --dirty 2>/dev/null || cat VERSION 2>/dev/null || echo 0)

SPEC := $(wildcard tlfs_spec/*.yaml)
GEN_SRC := $(wildcard hypercall_gen/*.py)
GEN_STAMP := gen/.stamp
KSRC := Kbuild $(wildcard mshv/*.c mshv/*.h)

# A dist tarball ships gen/ pre-generated and has no tlfs_spec/: use it as is.
ifneq ($(wildcard gen/PREGENERATED),)
GEN_STAMP :=
endif

.PHONY: all modules generate clean dist headers_install run check debian-modules setup mutate bench

all: modules

$(GEN_STAMP): $(SPEC) $(GEN_SRC)
	@echo "  GEN     gen/ from tlfs_spec/"
	@$(PYTHON) -m hypercall_gen --out gen
	@touch $@

generate: $(GEN_STAMP)

modules: $(GEN_STAMP)
	@if [ ! -d "$(KDIR)" ]; then \
		echo "error: no kernel build tree at KDIR=$(KDIR)." >&2; \
		echo "       Install the headers (Debian: apt-get install linux-headers-$$(uname -r))" >&2; \
		echo "       or point KDIR at a configured kernel tree." >&2; \
		exit 1; fi
	$(MAKE) -C $(KDIR) M=$(CURDIR) $(if $(HVSIM),HVSIM=1) modules

clean:
	@if [ -d "$(KDIR)" ]; then $(MAKE) -C $(KDIR) M=$(CURDIR) clean; fi
	rm -rf build dist
	@if [ -z "$(wildcard gen/PREGENERATED)" ]; then rm -rf gen; fi

# Build for every Debian kernel whose headers are installed (6.1 and 6.12
# after scripts/setup.sh), each in its own tree under build/, with W=1.
debian-modules: $(GEN_STAMP)
	@scripts/build-debian.sh $(if $(HVSIM),HVSIM=1)

headers_install: $(GEN_STAMP)
	@test -n "$(INSTALL_HDR_PATH)" || { echo "usage: make headers_install INSTALL_HDR_PATH=DIR" >&2; exit 1; }
	install -d $(INSTALL_HDR_PATH)/include/linux
	install -m 0644 gen/uapi/linux/mshv.h $(INSTALL_HDR_PATH)/include/linux/mshv.h

dist: $(GEN_STAMP)
	@rm -rf dist/mshv_root-$(VERSION) && mkdir -p dist/mshv_root-$(VERSION)
	cp -r Kbuild Makefile README.md mshv dist/mshv_root-$(VERSION)/
	mkdir -p dist/mshv_root-$(VERSION)/gen
	cp -r gen/uapi gen/*.c gen/*.h dist/mshv_root-$(VERSION)/gen/
	rm -f dist/mshv_root-$(VERSION)/gen/mshvr_layout_dump.c
	echo "generated from tlfs_spec/ at $(VERSION)" > dist/mshv_root-$(VERSION)/gen/PREGENERATED
	echo "$(VERSION)" > dist/mshv_root-$(VERSION)/VERSION
	sed -e 's/@VERSION@/$(VERSION)/' scripts/dkms.conf.in > dist/mshv_root-$(VERSION)/dkms.conf
	tar -C dist -czf dist/mshv_root-$(VERSION).tar.gz mshv_root-$(VERSION)
	@echo "  DIST    dist/mshv_root-$(VERSION).tar.gz"

setup:
	@scripts/setup.sh

run: setup
	@$(MAKE) --no-print-directory PYTHON=$(VENV)/bin/python debian-modules
	@$(VENV)/bin/python scripts/hvsim-run.py

check: setup
	@$(MAKE) --no-print-directory PYTHON=$(VENV)/bin/python generate
	@$(VENV)/bin/python -m pytest tests -q -ra

bench: setup
	@$(VENV)/bin/python tests/hvsim/bench.py $(BENCH_FLAGS)

mutate: setup
	@$(MAKE) --no-print-directory PYTHON=$(VENV)/bin/python generate
	@$(VENV)/bin/python scripts/mutate.py $(if $(ONLY),--only $(ONLY)) $(if $(KERNELS),--kernels $(KERNELS)) $(MUTATE_FLAGS)
