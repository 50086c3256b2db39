# Shared set-up of test/run.sh, test/demo.sh and test/bench/run.sh; sourced,
# from the top of the source tree.
#
#   voutbox_build           install the dependencies, fetch Kafka, build the
#                           extension and the test tool, install the extension
#                           (with VOUTBOX_PREINSTALLED=1, only the first two)
#   voutbox_as_user DIR     PostgreSQL refuses to run as root: as root, make
#                           sure an unprivileged user exists and owns DIR.
#                           Sets the array "as" to the command prefix that
#                           runs a command as that user (empty otherwise).
#   voutbox_sanitize_build DIR
#                           build the extension with -fsanitize=address,undefined
#                           in a copy of the tree in DIR and install it (the
#                           server must then run with libasan preloaded); sets
#                           VOUTBOX_SANITIZE_PRELOAD to the LD_PRELOAD list for
#                           the server (see test/perl/VoutboxTest.pm).  Reinstall
#                           the normal build with make install afterwards.

export PATH=/usr/lib/postgresql/15/bin:$PATH
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

voutbox_build() {
	local sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	bash test/install-deps.sh
	test/kafka/fetch.sh >/dev/null
	# (test/deb.sh: the extension is installed from the Debian package.)
	[ "${VOUTBOX_PREINSTALLED:-0}" = 1 ] && return 0
	make -s PG_CONFIG=$PG_CONFIG all test-tools
	$sudo make -s PG_CONFIG=$PG_CONFIG install
}

voutbox_as_user() {
	as=()
	[ "$(id -u)" -eq 0 ] || return 0
	local user=${VOUTBOX_TEST_USER:-voutbox_test}
	id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
	chown -R "$user" "$1"
	chmod 755 "$1"
	as=(runuser -u "$user" --)
}

voutbox_sanitize_build() {
	local dir=$1 sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	mkdir -p "$dir"
	cp -a . "$dir/"
	chmod 755 "$dir"
	make -C "$dir" -s PG_CONFIG=$PG_CONFIG clean
	make -C "$dir" -s PG_CONFIG=$PG_CONFIG VOUTBOX_SANITIZE=1 all
	$sudo make -C "$dir" -s PG_CONFIG=$PG_CONFIG VOUTBOX_SANITIZE=1 install
	# A shim preloaded after the sanitizer runtimes, for two problems with
	# them in PostgreSQL:
	# - Preloaded, libasan initializes itself at the first malloc().  In
	#   postgres (Debian's links libgcrypt and so libgpg-error) that first
	#   malloc() is inside the bindtextdomain() of libgpg-error's constructor,
	#   which holds glibc's gettext lock, and ASan's start-up calls dlerror()
	#   and so gettext: the process hangs before main().  The shim's
	#   bindtextdomain() starts ASan before taking the lock.
	# - libubsan reads UBSAN_OPTIONS from /proc/self/environ at its first
	#   report, and by then the server has overwritten that memory with its
	#   process title.  The shim keeps a copy made at start-up and hands it to
	#   libubsan through __ubsan_default_options().
	gcc -shared -fPIC -O2 -Wall -o "$dir/sanitizer_shim.so" -x c - <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

static const char *ubsan_options = "";

__attribute__((constructor)) static void
save_ubsan_options(void)
{
	const char *o = getenv("UBSAN_OPTIONS");

	if (o)
		ubsan_options = strdup(o);
}

const char *
__ubsan_default_options(void)
{
	return ubsan_options;
}

char *
bindtextdomain(const char *domain, const char *dirname)
{
	static char *(*real)(const char *, const char *);

	if (!real)
	{
		void *volatile p = malloc(1);	/* volatile: not optimized out */

		free(p);
		real = (char *(*)(const char *, const char *)) dlsym(RTLD_NEXT, "bindtextdomain");
	}
	return real(domain, dirname);
}
EOF
	VOUTBOX_SANITIZE_PRELOAD="$(readlink -f "$(gcc -print-file-name=libasan.so)") $dir/sanitizer_shim.so"
}
