# Convenience wrapper around meson/ninja.  The README's two commands:
#   make demo    install what is missing, build, run the demo
#   make check   install what is missing, build, run every test
BUILD ?= build
MESON_OPTS ?= -Dwerror=true -Dbuildtype=debugoptimized

# Debian packages needed to build and test (see README "Dependencies").
PACKAGES = build-essential meson ninja-build pkg-config python3 \
	libglib2.0-dev liburing-dev libaio-dev zlib1g-dev libzstd-dev libdeflate-dev \
	qemu-utils fio e2fsprogs util-linux strace \
	python3-vmdkstream python3-libvmdk libvmdk-utils clang libclang-rt-14-dev \
	xfsprogs

SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build check test demo bench install clean

all: build

deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing: $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

# The whole test suite; the last line is "N passed, N failed, N skipped".
check: build
	@meson test -C $(BUILD) --num-processes 2 --print-errorlogs > $(BUILD)/meson-test-output.txt 2>&1; \
	tail -n 25 $(BUILD)/meson-test-output.txt | grep -E '^(Ok|Fail|Skipped|Timeout|Expected|Unexpected)' || true; \
	python3 tests/summary.py $(BUILD)/meson-logs/testlog.json

test: check

demo: build
	@sh examples/demo.sh $(BUILD)/tools/vdk

bench: build
	@sh examples/bench-raw.sh $(BUILD)/tools/vdk

install: build
	meson install -C $(BUILD)

clean:
	rm -rf $(BUILD)
