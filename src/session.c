/*-------------------------------------------------------------------------
 *
 * session.c
 *		The delivery worker's session: settings no database role can change.
 *
 * The worker connects as the bootstrap superuser, and PostgreSQL applies
 * the defaults of pg_db_role_setting as it connects: ALTER DATABASE ... SET
 * and ALTER ROLE ... SET, which the owner of the database may write.  Left
 * alone they would give that owner the worker: a search_path that puts its
 * own schema before pg_catalog (a look-alike function then runs with the
 * worker's rights), "role" (the worker would act as that owner),
 * default_transaction_read_only, statement_timeout, lock_timeout...
 *
 * So before it connects, the worker remembers every setting as the
 * postmaster gave it (postgresql.conf, ALTER SYSTEM and the command line:
 * only superusers write those); once connected, it puts back every one that
 * a database or role default changed, and then pins the few it depends on
 * to fixed values.  Both at PGC_S_OVERRIDE: no configuration file or
 * database default overrides that source, and RESET goes back to it
 * (autovacuum pins its search_path the same way).  The price: a setting put
 * back so no longer follows a reload of postgresql.conf.  The worker runs no SQL
 * but its own, with every relation schema-qualified; with search_path
 * pinned to pg_catalog, its functions and operators resolve there alone,
 * where only superusers can create objects.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/memutils.h"

#include "voutbox.h"

/* What the worker depends on, whatever postgresql.conf says. */
static const struct
{
	const char *name;
	const char *value;
}			pinned[] =
{
	/* name resolution: pg_catalog alone (pg_temp is the worker's own) */
	{"search_path", "pg_catalog, pg_temp"},
	/* the window logic reads with a new snapshot per statement */
	{"default_transaction_isolation", "read committed"},
	{"default_transaction_read_only", "off"},
	{"default_transaction_deferrable", "off"},
	/*
	 * No lock a user can hold makes it wait long: it tries again later (an
	 * ERROR 55P03 it expects, stream.c); its other waits are its own.
	 */
	{"lock_timeout", VOUTBOX_LOCK_TIMEOUT},
	{"statement_timeout", "0"},
	{"idle_in_transaction_session_timeout", "0"},
	{"idle_session_timeout", "0"},
	/* a large window is sorted into temporary files */
	{"temp_file_limit", "-1"},
	/* the meaning of its SQL */
	{"session_replication_role", "origin"},
	{"transform_null_equals", "off"},
	{"standard_conforming_strings", "on"},
	{"row_security", "on"},
	{"TimeZone", "UTC"},
	{"DateStyle", "ISO, YMD"},
	{"IntervalStyle", "postgres"},
	/* the bootstrap superuser, not a role a default names */
	{"role", "none"},
	/*
	 * Its statements are written for indexes, and their plans are kept
	 * (spi.c): a plan made while a table is empty and without statistics
	 * must not scan it whole once it holds millions of rows.
	 */
	{"enable_seqscan", "off"},
	/* (which would make its plans' costs huge:) no JIT for its short statements */
	{"jit", "off"},
};

typedef struct SavedSetting
{
	char	   *name;
	char	   *value;
} SavedSetting;

static SavedSetting *saved = NULL;
static int	nsaved = 0;

/*
 * Before connecting: remember the settings a database or role default could
 * change (those of context user and superuser; others cannot be set so).
 */
void
voutbox_session_remember(void)
{
	struct config_generic **vars = get_guc_variables();
	int			n = GetNumConfigOptions();

	saved = MemoryContextAlloc(TopMemoryContext, sizeof(SavedSetting) * n);
	for (int i = 0; i < n; i++)
	{
		struct config_generic *g = vars[i];
		const char *value;

		if ((g->context != PGC_USERSET && g->context != PGC_SUSET) ||
			(g->flags & GUC_CUSTOM_PLACEHOLDER))
			continue;
		value = GetConfigOption(g->name, true, false);
		if (value == NULL)
			continue;
		saved[nsaved].name = MemoryContextStrdup(TopMemoryContext, g->name);
		saved[nsaved].value = MemoryContextStrdup(TopMemoryContext, value);
		nsaved++;
	}
}

static void
override(const char *name, const char *value)
{
	(void) set_config_option(name, value, PGC_SUSET, PGC_S_OVERRIDE, GUC_ACTION_SET,
							 true, ERROR, false);
}

/*
 * After connecting: undo what database and role defaults set, then pin.
 * Runs in a transaction, for the check hooks that look at the catalogs.
 */
void
voutbox_session_pin(void)
{
	struct config_generic **vars = get_guc_variables();
	int			n = GetNumConfigOptions();
	int			undone = 0;

	StartTransactionCommand();
	for (int i = 0; i < n; i++)
	{
		struct config_generic *g = vars[i];

		if (g->source != PGC_S_DATABASE && g->source != PGC_S_USER &&
			g->source != PGC_S_DATABASE_USER)
			continue;
		for (int j = 0; j < nsaved; j++)
		{
			if (strcmp(saved[j].name, g->name) == 0)
			{
				override(saved[j].name, saved[j].value);
				undone++;
				break;
			}
		}
	}
	/* Whatever a default said, the worker is the bootstrap superuser. */
	override("session_authorization", GetUserNameFromId(BOOTSTRAP_SUPERUSERID, false));
	for (size_t i = 0; i < lengthof(pinned); i++)
		override(pinned[i].name, pinned[i].value);
	CommitTransactionCommand();


	if (GetUserId() != BOOTSTRAP_SUPERUSERID || GetSessionUserId() != BOOTSTRAP_SUPERUSERID)
		ereport(FATAL,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("voutbox: the delivery worker does not run as the bootstrap superuser"),
				 errdetail("A database or role default (ALTER DATABASE ... SET role) changed its role.")));
	if (undone > 0)
		ereport(LOG,
				(errmsg("voutbox: the delivery worker ignores %d setting%s of database \"%s\" and its roles",
						undone, undone == 1 ? "" : "s", voutbox_worker_dbname),
				 errdetail("It runs with the server's own settings, which only superusers can change.")));
}
