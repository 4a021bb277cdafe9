# vfiod developer entry points. `make run` and `make test` are the two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# QEMU (>= 10.1 with vfio-user-pci) and guest images are cached outside the clone, so a
# second clone or a second CI run on the same machine reuses them.
export VFIOD_CACHE ?= $(HOME)/.cache/vfiod

.PHONY: venv run test test-fast test-cross cross-roots deb libvirt qemu guest-images systemd-image \
	bench fuzz soak lint clean

$(VENV)/.stamp: pyproject.toml setup.py $(wildcard cffi_build/*.py cffi_build/*.c cffi_build/*.h)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# The daemon on its embedded default (SR-IOV NVMe on a flat and a power8 PHB); it prints every
# socket and, per VF, a command that boots a guest on it, so QEMU and the guest images come first.
run: venv qemu guest-images
	$(PY) -m vfiod

qemu:
	tools/provision-qemu.sh

guest-images: qemu
	GUEST_ARCHES="$${GUEST_ARCHES:-x86_64 ppc64le}" tools/build-guest-images.sh

# A Debian trixie guest whose init is systemd, for tests/systemd (the unit under a real
# systemd; these machines do not run systemd as PID 1).
systemd-image: qemu
	tools/build-systemd-image.sh

test: venv qemu guest-images systemd-image libvirt deb cross-roots
	$(PY) -m pytest -q
	$(CI_CROSS_EXAMPLES) $(MAKE) --no-print-directory test-cross ARCH=ppc64el \
		CROSS_TESTS="$(CI_CROSS_TESTS)"
	$(CI_CROSS_EXAMPLES) $(MAKE) --no-print-directory test-cross ARCH=s390x \
		CROSS_TESTS="$(CI_CROSS_TESTS)"

# vfiod's tests on a foreign architecture under qemu-user, in a Debian trixie root of that
# architecture (tools/build-cross-root.sh; the cffi module is compiled there). ppc64el is the
# host vfiod is for; s390x is big-endian. Default: the whole non-QEMU suite; CROSS_TESTS picks
# tests (pytest arguments). `make test` runs CI_CROSS_TESTS on both (README has the times).
ARCH ?= ppc64el
CROSS_TESTS ?=
CI_CROSS_TESTS ?= tests/protocol tests/spapr tests/server tests/devices/nvme/test_nvme_c_mover.py \
	tests/devices/nvme/test_nvme_async.py
# fewer generated examples under emulation (5-20x slower; the native run has the full counts)
CI_CROSS_EXAMPLES ?= FP_EXAMPLES=30 HOOK_EXAMPLES=25 NVME_C_EXAMPLES=40 NVME_ASYNC_EXAMPLES=10
test-cross:
	tools/test-cross.sh $(ARCH) $(CROSS_TESTS)

cross-roots:
	tools/build-cross-root.sh ppc64el
	tools/build-cross-root.sh s390x

# Debian's libvirtd and virsh, for tests/libvirt (docs/libvirt.md's recipes, run).
libvirt:
	tools/provision-libvirt.sh

# build/deb/vfiod_<version>_<arch>.deb, built in a cached Debian trixie root (tools/build-deb.sh).
deb:
	tools/build-deb.sh

# Everything that needs no QEMU (quick edit-test loop).
test-fast: venv
	$(PY) -m pytest -q -m 'not qemu'

bench: venv
	$(PY) -m bench

# A million hostile messages against a live daemon (make test runs 100,000); the report, with
# the machine it ran on, goes to bench/results/. FUZZ_MESSAGES and FUZZ_SEED to vary. Then
# atheris (coverage-guided, installed here: not a test dependency) on protocol/, ATHERIS_RUNS
# inputs; its corpus and any crash reproducer stay in build/fuzz/.
fuzz: venv
	$(PY) tests/hostile/session_fuzz.py --messages $${FUZZ_MESSAGES:-1000000} \
		$${FUZZ_SEED:+--seed $$FUZZ_SEED} --json bench/results/fuzz-$$(date -u +%Y%m%dT%H%M%SZ).json
	$(VENV)/bin/pip install -q atheris
	mkdir -p build/fuzz/corpus
	$(PY) tests/hostile/protocol_atheris.py -runs=$${ATHERIS_RUNS:-1000000} \
		-artifact_prefix=build/fuzz/ build/fuzz/corpus

# x86 TCG guests: a QEMU SIGKILLed mid-I/O 100 times on one NVMe VF while another VF's guest
# does checked I/O; the daemon's fds, locked memory and RSS must come back to the baseline
# (make test runs 3 kills). The figures go to bench/results/. SOAK_KILLS to vary.
soak: venv qemu guest-images
	$(PY) tests/hostile/soak.py --kills $${SOAK_KILLS:-100} \
		--json bench/results/soak-$$(date -u +%Y%m%dT%H%M%SZ).json

lint: venv
	$(VENV)/bin/ruff check vfiod protocol cffi_build tests bench examples tools
	$(VENV)/bin/mypy vfiod protocol bench

clean:
	rm -rf $(VENV) build *.egg-info vfiod/_tce*.so vfiod/_fast*.so
