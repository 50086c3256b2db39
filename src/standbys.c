/*-------------------------------------------------------------------------
 *
 * standbys.c
 *		Whether the standbys have flushed the WAL up to a point: the
 *		synchronous ones, and those named in voutbox.standby_names.
 *
 * After a failover, an event in Kafka whose commit the promoted standby
 * does not have is a phantom: published, but never committed as far as the
 * new primary knows.  So the worker sends a round only once the standbys
 * that a failover may promote have flushed the WAL up to where it was
 * written when the round was read (storage.c): every commit the round's
 * reads could see is then on them.
 *
 *  - Synchronous replication (synchronous_standby_names): a commit usually
 *    becomes visible only once the synchronous standbys have it, but not
 *    always: a session may commit with synchronous_commit = local or off, a
 *    commit whose wait is cancelled becomes visible all the same, and so do
 *    those of backends that find the postmaster gone while they wait.  The
 *    worker therefore waits for the position the synchronous standbys are
 *    known to have flushed (WalSndCtl->lsn[SYNC_REP_WAIT_FLUSH], which
 *    syncrep.c advances as they report), whatever the sessions chose.
 *  - Asynchronous standbys named in voutbox.standby_names: each must have
 *    reported the WAL flushed (its physical WAL sender's flush position).
 *
 * The check reads shared memory (the WAL senders, and the backend status
 * array for their application_name, the latter only when a sender's pid
 * changed): no SQL, so that a worker waiting for a standby that is down
 * costs little.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "replication/walsender_private.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#include "voutbox.h"

/* The names of voutbox.standby_names, parsed once per value of it. */
static char *parsed_value = NULL;
static List *parsed_names = NIL;

/*
 * What each WAL sender slot was when last looked at: the pid, and whether it
 * is a physical sender and its application_name (the latter looked up only
 * when the pid changes).
 */
typedef struct SenderSeen
{
	int			pid;
	bool		physical;
	char		appname[NAMEDATALEN];
} SenderSeen;

static SenderSeen *seen = NULL;

static List *
standby_names(void)
{
	MemoryContext old;
	char	   *copy;
	List	   *names = NIL;
	ListCell   *lc;

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
	if (SplitIdentifierString(copy, ',', &names))
		foreach(lc, names)
			parsed_names = lappend(parsed_names, pstrdup((char *) lfirst(lc)));
	list_free(names);
	pfree(copy);
	MemoryContextSwitchTo(old);
	return parsed_names;
}

/* Whether voutbox.standby_names names any standby. */
static bool
standbys_named(void)
{
	return voutbox_standby_names != NULL && voutbox_standby_names[0] != '\0' &&
		standby_names() != NIL;
}

/* Whether synchronous replication is configured (synchronous_standby_names). */
static bool
sync_standbys_defined(void)
{
	bool		defined;

	if (WalSndCtl == NULL)
		return false;
	/* (An unlocked read, as SyncRepWaitForLSN()'s first look.) */
#ifdef SYNC_STANDBY_DEFINED
	defined = (WalSndCtl->sync_standbys_status & SYNC_STANDBY_DEFINED) != 0;
#else
	defined = WalSndCtl->sync_standbys_defined;
#endif
	return defined;
}

/* Whether a round must wait for standbys before it goes. */
bool
voutbox_standbys_gate(void)
{
	return sync_standbys_defined() || standbys_named();
}

/*
 * Look up, in a fresh snapshot of the backend status array, whether the
 * WAL sender with this pid is a physical one (not a logical decoding
 * client) and its application_name.
 */
static void
describe_sender(SenderSeen *s)
{
	int			n;

	s->physical = false;
	s->appname[0] = '\0';
	pgstat_clear_backend_activity_snapshot();
	n = pgstat_fetch_stat_numbackends();
	for (int i = 1; i <= n; i++)
	{
		LocalPgBackendStatus *local = pgstat_fetch_stat_local_beentry(i);

		if (local == NULL || local->backendStatus.st_procpid != s->pid)
			continue;
		s->physical = !OidIsValid(local->backendStatus.st_databaseid);
		strlcpy(s->appname, local->backendStatus.st_appname, NAMEDATALEN);
		break;
	}
	pgstat_clear_backend_activity_snapshot();
}

/*
 * Whether the standbys a failover may promote have flushed the WAL up to
 * lsn: the synchronous ones (if synchronous_standby_names is set) and each
 * one named in voutbox.standby_names.  If not, *behind says which.
 */
bool
voutbox_standbys_confirmed(XLogRecPtr lsn, const char **behind)
{
	ListCell   *lc;
	XLogRecPtr *flushed;

	*behind = NULL;
	if (WalSndCtl == NULL)
		return true;
	if (sync_standbys_defined())
	{
		XLogRecPtr	synced;

		LWLockAcquire(SyncRepLock, LW_SHARED);
		synced = WalSndCtl->lsn[SYNC_REP_WAIT_FLUSH];
		LWLockRelease(SyncRepLock);
		if (synced < lsn)
		{
			*behind = "the synchronous standbys";
			return false;
		}
	}
	if (!standbys_named())
		return true;

	if (seen == NULL)
		seen = MemoryContextAllocZero(TopMemoryContext, sizeof(SenderSeen) * max_wal_senders);
	flushed = palloc(sizeof(XLogRecPtr) * max_wal_senders);
	for (int i = 0; i < max_wal_senders; i++)
	{
		WalSnd	   *w = &WalSndCtl->walsnds[i];
		int			pid;

		SpinLockAcquire(&w->mutex);
		pid = w->pid;
		/* (What a client reports flushed beyond what it was sent means nothing.) */
		flushed[i] = Min(w->flush, w->sentPtr);
		SpinLockRelease(&w->mutex);
		if (pid != seen[i].pid)
		{
			seen[i].pid = pid;
			if (pid != 0)
				describe_sender(&seen[i]);
		}
	}
	foreach(lc, standby_names())
	{
		const char *name = lfirst(lc);
		bool		confirmed = false;

		for (int i = 0; i < max_wal_senders && !confirmed; i++)
			confirmed = seen[i].pid != 0 && seen[i].physical &&
				!XLogRecPtrIsInvalid(flushed[i]) && flushed[i] >= lsn &&
				pg_strcasecmp(seen[i].appname, name) == 0;
		if (!confirmed)
		{
			static char phrase[NAMEDATALEN + 16];

			snprintf(phrase, sizeof(phrase), "standby \"%s\"", name);
			*behind = phrase;
			break;
		}
	}
	pfree(flushed);
	return *behind == NULL;
}
