# voutbox: PGXS build
#
#   make && sudo make install      build and install the extension
#   make installcheck              pg_regress (own temporary instance) and the TAP suite
#   make test-tools                the Kafka test helper used by the TAP suite

EXTENSION   = voutbox
MODULE_big  = voutbox
OBJS        = $(patsubst %.c,%.o,$(wildcard src/*.c))
DATA        = $(wildcard voutbox--*.sql)
PGFILEDESC  = "voutbox - transactional outbox delivered to Apache Kafka"

PG_CONFIG  ?= pg_config

PG_CPPFLAGS = -isystem $(shell $(PG_CONFIG) --includedir-server) $(shell pkg-config --cflags rdkafka json-c)
SHLIB_LINK  = $(shell pkg-config --libs rdkafka json-c)
PG_CFLAGS   = -Wall -Wextra -Werror=implicit-function-declaration $(VOUTBOX_CFLAGS)

# make VOUTBOX_SANITIZE=1: build the module with AddressSanitizer and
# UndefinedBehaviorSanitizer (any finding aborts).  Start from a clean tree
# (make clean): objects built without it are not rebuilt.  The server must be
# started with libasan preloaded; test/run.sh does so for its sanitizer pass.
ifeq ($(VOUTBOX_SANITIZE),1)
SANITIZE_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
PG_CFLAGS  += $(SANITIZE_FLAGS)
SHLIB_LINK += $(SANITIZE_FLAGS)
endif

REGRESS      = save validation idempotency storage dlq tenants databases topics routes
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf
ISOLATION    = idempotency_concurrency routes_cache
ISOLATION_OPTS = --temp-instance=tmp_check_isolation --temp-config=$(srcdir)/test/regress.conf

TAP_TESTS   = 1
PROVE_TESTS = test/t/*.pl

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every source file includes the internal header.
$(OBJS): src/voutbox.h

# After pgxs.mk, which resets it.
PROVE_FLAGS += -I $(srcdir)/test/perl

# A small librdkafka consumer and admin client for the tests and the demo.
TEST_TOOL = test/tools/vkafka
$(TEST_TOOL): test/tools/vkafka.c
	$(CC) -O2 -Wall -Wextra -o $@ $< $(shell pkg-config --cflags --libs rdkafka json-c)
test-tools: $(TEST_TOOL)
installcheck: $(TEST_TOOL)
all: $(TEST_TOOL)

EXTRA_CLEAN = $(TEST_TOOL) tmp_check_regress tmp_check_isolation results output_iso regression.diffs regression.out
.PHONY: test-tools
