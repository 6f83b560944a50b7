# updatelab: common commands. Run `make setup` once on a new machine (as root).
# The virtual environment that `make setup` creates; python3 where there is none yet.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PYTEST ?= $(PYTHON) -m pytest
LAB ?= $(PYTHON) -m lab
comma := ,
LINUX_TARGETS ?= debian12-systemd,debian13-systemd,debian12-sysvinit,debian12-i386-systemd,debian12-openrc,debian12-runit
CYCLES ?= 3
REPORT_DIR ?= runs/lab-linux

.PHONY: setup test test-fast lab-linux lab-vm lab-faults images bench clean

setup:
	sh scripts/setup.sh

# Every test: unit, fuzz, the real agent on this host, container runs (skipped only where
# Docker cannot run) and VM runs (skipped only where Vagrant and libvirt cannot be set up).
test:
	$(PYTEST) -q -rs

# Tests that need neither Docker nor the real agent.
test-fast:
	$(PYTEST) -q -m "not agent and not docker"

images:
	$(LAB) images build

# The offline Linux matrix in both modes; exits 0 exactly when every outcome matches
# expectations.toml.
lab-linux:
	$(LAB) agents fetch >/dev/null
	$(LAB) agents fetch --version 0.7.99 >/dev/null
	$(LAB) images build $(subst $(comma), ,$(LINUX_TARGETS))
	$(LAB) run --provider docker --targets $(LINUX_TARGETS) --mode native,recovery \
		--cycles $(CYCLES) --expectations expectations.toml --report-dir $(REPORT_DIR)

# Every fault scenario in scenarios/ against the real agent; exits 0 when each one observed
# what it expects.
FAULTS_REPORT_DIR ?= runs/lab-faults
lab-faults:
	$(LAB) agents fetch >/dev/null
	$(LAB) agents fetch --version 0.7.99 >/dev/null
	$(LAB) images build debian12-systemd debian12-sysvinit
	$(LAB) reproduce scenarios --report-dir $(FAULTS_REPORT_DIR)

# debian12-vm through Vagrant and libvirt, native and recovery. Installs and starts what is
# missing (scripts/ensure-vagrant.sh) and builds the box when it is missing (cached).
lab-vm:
	sh scripts/ensure-vagrant.sh
	$(LAB) agents fetch >/dev/null
	$(LAB) boxes build debian12-vm
	$(LAB) run --provider vagrant --targets debian12-vm --mode native,recovery \
		--cycles $(CYCLES) --report-dir runs/lab-vm

bench:
	$(PYTHON) bench/bench_native.py

clean:
	$(LAB) clean
