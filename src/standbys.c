/*-------------------------------------------------------------------------
 *
 * standbys.c
 *		Whether the standbys named in voutbox.standby_names have flushed the
 *		WAL up to a point.
 *
 * With asynchronous replication a commit is visible on the primary before a
 * standby has it; if the primary is lost and that standby promoted, the
 * commit is gone, and an event of it already in Kafka would be a phantom:
 * published, but never committed as far as the new primary knows.  With
 * voutbox.standby_names set, the worker opens a window of transactions
 * (storage.c) and delivers its events only once every named standby has
 * reported the WAL flushed up to where the window's commits were written.
 * Synchronous replication needs none of this: a commit does not become
 * visible before the synchronous standbys confirm it.
 *
 * The check reads the WAL senders' shared memory and, for their
 * application_name, the backend status array: no transaction, no SQL, so
 * that a worker waiting for a standby that is down costs little.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "replication/walsender.h"
#include "replication/walsender_private.h"
#include "storage/spin.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#include "voutbox.h"

/* The names of voutbox.standby_names, parsed once per value of it. */
static char *parsed_value = NULL;
static List *parsed_names = NIL;

static List *
standby_names(void)
{
	MemoryContext old;
	char	   *copy;

	if (parsed_value != NULL && strcmp(parsed_value, voutbox_standby_names) == 0)
		return parsed_names;
	if (parsed_value != NULL)
	{
		list_free_deep(parsed_names);
		pfree(parsed_value);
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	parsed_value = pstrdup(voutbox_standby_names);
	parsed_names = NIL;
	copy = pstrdup(voutbox_standby_names);
	/* (The check hook accepted the value: it parses.) */
	if (!SplitIdentifierString(copy, ',', &parsed_names))
		parsed_names = NIL;
	/* Keep the names, not pointers into the copy. */
	{
		List	   *names = NIL;
		ListCell   *lc;

		foreach(lc, parsed_names)
			names = lappend(names, pstrdup((char *) lfirst(lc)));
		list_free(parsed_names);
		parsed_names = names;
	}
	MemoryContextSwitchTo(old);
	return parsed_names;
}

/* Whether voutbox.standby_names names any standby. */
bool
voutbox_standbys_named(void)
{
	return voutbox_standby_names != NULL && voutbox_standby_names[0] != '\0' &&
		standby_names() != NIL;
}

/* The application_name of the backend with this pid, from the status snapshot. */
static const char *
appname_of(int pid)
{
	int			n = pgstat_fetch_stat_numbackends();

	for (int i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *local = pgstat_fetch_stat_local_beentry(i);

		if (local != NULL && local->backendStatus.st_procpid == pid)
			return local->backendStatus.st_appname;
	}
	return NULL;
}

/*
 * Whether every standby named in voutbox.standby_names has flushed the WAL
 * up to lsn; if not, *behind names one that has not (connected or not).
 * True when none is named.
 */
bool
voutbox_standbys_confirmed(XLogRecPtr lsn, const char **behind)
{
	List	   *names;
	ListCell   *lc;
	XLogRecPtr *flushed;
	int		   *pids;
	bool		ok = true;

	*behind = NULL;
	if (!voutbox_standbys_named() || WalSndCtl == NULL)
		return true;
	names = standby_names();
	flushed = palloc(sizeof(XLogRecPtr) * max_wal_senders);
	pids = palloc(sizeof(int) * max_wal_senders);
	for (int i = 0; i < max_wal_senders; i++)
	{
		WalSnd	   *w = &WalSndCtl->walsnds[i];

		SpinLockAcquire(&w->mutex);
		pids[i] = w->pid;
		flushed[i] = w->flush;
		SpinLockRelease(&w->mutex);
	}
	/* A fresh look at the backends: one may have reconnected since. */
	pgstat_clear_backend_activity_snapshot();
	foreach(lc, names)
	{
		const char *name = lfirst(lc);
		bool		confirmed = false;

		for (int i = 0; i < max_wal_senders && !confirmed; i++)
		{
			const char *appname;

			if (pids[i] == 0 || XLogRecPtrIsInvalid(flushed[i]) || flushed[i] < lsn)
				continue;
			appname = appname_of(pids[i]);
			confirmed = appname != NULL && pg_strcasecmp(appname, name) == 0;
		}
		if (!confirmed)
		{
			*behind = name;
			ok = false;
			break;
		}
	}
	pgstat_clear_backend_activity_snapshot();
	pfree(flushed);
	pfree(pids);
	return ok;
}
