# The two set-up commands of the README: `make run` and `make test`.
# Both install what they need on a fresh Debian 12 machine (as root, or with sudo).
# Debian's interpreter: the one whose venv module and headers the apt step installs (python3-venv,
# python3-dev), and the one the service runs on (systemd/authmilter.service, docker/). A python3
# found first on PATH may be another: pyenv's 3.11.7 on the benchmark machine, built without
# profile-guided and link-time optimisation, ran our Python about a fifth slower (bench/README.md).
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The venv's stamp names the interpreter it was made from, so that a venv made from another one (by
# an earlier Makefile, or another PYTHON) is made again rather than kept.
VENV_STAMP := $(VENV)/.installed$(subst /,_,$(shell readlink -f "$$(command -v $(PYTHON))"))
CONFIG ?= conf/authmilter.toml
# knot: the authoritative DNS server the tests run on loopback; systemd: systemd-analyze for the
# unit's test; postfix: the private MTA of tests/integration; opendkim: the independent DKIM
# verifier and signer of the interoperability tests (system services disabled below); groff-base and
# man-db: the man page's test renders it; libwrap0, m4: the unpacked Sendmail's one library not
# installed otherwise, and its config builder; postgresql: the report store's second database,
# run by the tests in a temporary directory (service disabled).
APT_PACKAGES := libmilter-dev gcc python3-dev python3-venv knot systemd postfix opendkim opendkim-tools \
	groff-base man-db libwrap0 m4 postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Only for `make bench`: the OpenDKIM + OpenDMARC pair it compares against.
BENCH_APT_PACKAGES := opendmarc iproute2

# The Sendmail of tests/integration (sendmail.py): downloaded and unpacked, never installed, since
# Debian's sendmail-bin conflicts with postfix. Its shared libraries come with APT_PACKAGES.
SENDMAIL_PACKAGES := sendmail-bin sendmail-cf
SENDMAIL_CACHE    := .cache/sendmail

.PHONY: run test lint bench test-docker deps apt bench-apt sendmail clean man

# Starts the milter on the embedded default config (inet:8990@127.0.0.1, verify only); Ctrl-C stops it.
run: deps
	$(BIN)/authmilter run --config $(CONFIG)

test: deps sendmail
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# authmilter(8) from the command line's parser and conf/authmilter.toml; tests/test_manpage.py
# fails when docs/authmilter.8 is not what this makes.
man: deps
	$(BIN)/python -m authmilter.manpage > docs/authmilter.8

lint: deps
	$(BIN)/ruff check milter tests bench docker
	$(BIN)/mypy milter/authmilter

# Not a test: brings up loopback Postfix + Knot + sink and measures authmilter against no milter, a
# pymilter milter that checks nothing and OpenDKIM + OpenDMARC (bench/README.md). About 15 minutes;
# the queue on tmpfs keeps fsync out of it.
bench: deps bench-apt
	$(BIN)/python bench/run.py --compare --floor --queue-dir /dev/shm

# The integration suite against the containerised set-up (docker/README.md); not part of `make test`.
# Root; podman with runc; builds a base image with debootstrap once (cached), then about 30 s a run.
test-docker: deps
	docker/test-docker.sh

deps: $(VENV_STAMP)

# Debian packages first (pymilter compiles against libmilter), then the venv.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  echo "installing Debian packages:$$missing"; \
	  blocker=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null && $(SUDO) chmod 755 /usr/sbin/policy-rc.d && blocker=1; \
	  fi; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; status=$$?; \
	  [ -z "$$blocker" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	  [ $$status -eq 0 ] || exit $$status; \
	fi
	@# The tests run their own knotd on loopback; the system service must not take port 53.
	@$(SUDO) systemctl disable knot.service >/dev/null 2>&1 || true
	@[ ! -d /run/systemd/system ] || $(SUDO) systemctl stop knot.service || true
	@$(SUDO) systemctl disable postfix.service >/dev/null 2>&1 || true
	@[ ! -d /run/systemd/system ] || $(SUDO) systemctl stop postfix.service || true
	@$(SUDO) systemctl disable opendkim.service >/dev/null 2>&1 || true
	@[ ! -d /run/systemd/system ] || $(SUDO) systemctl stop opendkim.service || true
	@$(SUDO) systemctl disable postgresql.service >/dev/null 2>&1 || true
	@[ ! -d /run/systemd/system ] || $(SUDO) systemctl stop postgresql.service || true

sendmail: $(SENDMAIL_CACHE)/root/usr/libexec/sendmail/sendmail

# apt-get download fetches the candidate version of both (they must match); the lists may be empty
# on a fresh image, so they are updated once when the first try fails.
$(SENDMAIL_CACHE)/root/usr/libexec/sendmail/sendmail: | apt
	rm -rf $(SENDMAIL_CACHE) && mkdir -p $(SENDMAIL_CACHE)/debs
	cd $(SENDMAIL_CACHE)/debs && { apt-get download -q $(SENDMAIL_PACKAGES) \
	  || { $(SUDO) apt-get update -qq && apt-get download -q $(SENDMAIL_PACKAGES); }; }
	for deb in $(SENDMAIL_CACHE)/debs/*.deb; do dpkg-deb -x "$$deb" $(SENDMAIL_CACHE)/root || exit 1; done
	touch $@

bench-apt:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	@$(SUDO) systemctl disable opendmarc.service >/dev/null 2>&1 || true

$(VENV_STAMP): pyproject.toml | apt
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(SENDMAIL_CACHE)
