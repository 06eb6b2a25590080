# Convenience wrapper around meson/ninja.  The README's two commands:
#   make demo    install what is missing, build, run the demo
#   make check   install what is missing, build, run every test
BUILD ?= build
MESON_OPTS ?= -Dwerror=true -Dbuildtype=debugoptimized

# Debian packages needed to build and test (see README "Dependencies").
PACKAGES = build-essential meson ninja-build pkg-config python3 \
	libglib2.0-dev liburing-dev libaio-dev zlib1g-dev libzstd-dev libdeflate-dev libssl-dev \
	qemu-utils fio e2fsprogs util-linux strace \
	python3-vmdkstream python3-libvmdk libvmdk-utils clang libclang-rt-14-dev \
	libfuse3-dev fuse3 xfsprogs libnbd-bin

SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build check check-asan check-asan-run test demo bench install clean

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
# With SANITIZE=1 the suite runs a second time
# in a build with AddressSanitizer and UndefinedBehaviorSanitizer, and the
# last line counts both runs.
SANITIZE ?= 0
ASAN_BUILD ?= $(BUILD)-asan
check: build
	@meson test -C $(BUILD) --num-processes 2 --print-errorlogs > $(BUILD)/meson-test-output.txt 2>&1; \
	tail -n 25 $(BUILD)/meson-test-output.txt | grep -E '^(Ok|Fail|Skipped|Timeout|Expected|Unexpected)' || true; \
	if [ "$(SANITIZE)" = 1 ]; then \
		echo "Running the suite again under ASan+UBSan ($(ASAN_BUILD))"; \
		$(MAKE) --no-print-directory check-asan-run; \
		python3 tests/summary.py $(BUILD)/meson-logs/testlog.json asan:$(ASAN_BUILD)/meson-logs/testlog.json; \
	else \
		python3 tests/summary.py $(BUILD)/meson-logs/testlog.json; \
	fi

# The sanitizer pass alone (its summary line covers only itself).  The fuzz
# targets are sanitized already; the install test links a plain program
# against the library, which an ASan library cannot serve.
check-asan: deps check-asan-run
	@python3 tests/summary.py $(ASAN_BUILD)/meson-logs/testlog.json

check-asan-run:
	@[ -f $(ASAN_BUILD)/build.ninja ] || meson setup $(ASAN_BUILD) $(MESON_OPTS) -Db_sanitize=address,undefined >/dev/null
	@ninja -C $(ASAN_BUILD) >/dev/null
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		meson test -C $(ASAN_BUILD) --num-processes 2 --print-errorlogs --no-suite fuzz --no-suite install \
		> $(ASAN_BUILD)/meson-test-output.txt 2>&1; \
	tail -n 25 $(ASAN_BUILD)/meson-test-output.txt | grep -E '^(Ok|Fail|Skipped|Timeout)' || true

test: check

demo: build
	@sh examples/demo.sh $(BUILD)/tools/vdk

bench: build
	@sh examples/bench-raw.sh $(BUILD)/tools/vdk

install: build
	meson install -C $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
