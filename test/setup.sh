# Shared set-up of test/run.sh, test/demo.sh and test/bench/run.sh; sourced,
# from the top of the source tree.
#
#   voutbox_build           install the dependencies, fetch Kafka, build the
#                           extension and the test tool, install the extension
#   voutbox_as_user DIR     PostgreSQL refuses to run as root: as root, make
#                           sure an unprivileged user exists and owns DIR.
#                           Sets the array "as" to the command prefix that
#                           runs a command as that user (empty otherwise).

export PATH=/usr/lib/postgresql/15/bin:$PATH
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

voutbox_build() {
	local sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	bash test/install-deps.sh
	test/kafka/fetch.sh >/dev/null
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
