#!/bin/sh
# After `meson install`, `pkg-config --cflags --libs vdk` is all a program
# needs: build the example VMM loop against the staged install and run it.
# The public header also compiles on its own as C99 and as C++.
# usage: test-install.sh BUILD_DIR SOURCE_DIR
set -u
B=$1
S=$2
D=$(mktemp -d "${TMPDIR:-/var/tmp}/vdk-install-XXXXXX")
trap 'rm -rf "$D"' EXIT
echo "1..4"
if DESTDIR="$D/stage" meson install -C "$B" --no-rebuild --quiet >"$D/install.log" 2>&1; then
	echo "ok 1 - meson install"
else
	echo "not ok 1 - meson install: $(tail -3 "$D/install.log")"
fi
pc=$(find "$D/stage" -name vdk.pc | head -n 1)
if [ -n "$pc" ]; then
	# Point the staged vdk.pc at the staging directory (as if installed there).
	mkdir -p "$D/pc"
	prefix=$(sed -n 's/^prefix=//p' "$pc")
	sed "s|^prefix=.*|prefix=$D/stage$prefix|" "$pc" >"$D/pc/vdk.pc"
	export PKG_CONFIG_PATH="$D/pc"
	flags=$(pkg-config --cflags --libs vdk 2>&1)
	libdir=$(pkg-config --variable=libdir vdk)
	if cc -std=c99 -Wall -Werror -o "$D/vmm-loop" "$S/examples/vmm-loop.c" -D_GNU_SOURCE $flags 2>"$D/cc.log"; then
		truncate -s 8M "$D/disk.raw"
		if LD_LIBRARY_PATH="$libdir" "$D/vmm-loop" --requests=500 "$D/disk.raw" >"$D/run.log" 2>&1; then
			echo "ok 2 - example built with pkg-config runs"
		else
			echo "not ok 2 - example failed: $(cat "$D/run.log")"
		fi
	else
		echo "not ok 2 - example does not build with pkg-config flags '$flags': $(head -5 "$D/cc.log")"
	fi
else
	echo "not ok 2 - no vdk.pc installed"
fi
glib=$(pkg-config --cflags glib-2.0)
printf '#include <vdk/vdk.h>\nint main(void) { return vdk_image_get_size(0) == 0; }\n' >"$D/h.c"
if cc -std=c99 -pedantic -Wall -Wextra -Werror -fsyntax-only -I"$S/include" $glib "$D/h.c" 2>"$D/c99.log"; then
	echo "ok 3 - vdk.h compiles alone as C99"
else
	echo "not ok 3 - vdk.h as C99: $(head -5 "$D/c99.log")"
fi
if command -v c++ >/dev/null 2>&1; then
	cp "$D/h.c" "$D/h.cc"
	if c++ -Wall -Wextra -Werror -fsyntax-only -I"$S/include" $glib "$D/h.cc" 2>"$D/cxx.log"; then
		echo "ok 4 - vdk.h compiles as C++"
	else
		echo "not ok 4 - vdk.h as C++: $(head -5 "$D/cxx.log")"
	fi
else
	echo "ok 4 # SKIP no C++ compiler"
fi
