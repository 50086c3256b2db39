/*-------------------------------------------------------------------------
 *
 * privileges.c
 *		Who acts for which tenant, and acting as the extension's owner.
 *
 * Roles are bound to tenants in voutbox.tenant_roles.  As long as the table
 * is empty, everybody acts for every tenant (a single-tenant installation
 * needs no set-up); once it has a row, isolation is on and a role acts for
 * a tenant only if it has the privileges of a role bound to it (as
 * pg_has_role(..., 'USAGE') says), of voutbox_admin, or is a superuser.
 * outbox_save(), the DLQ administration functions and every view of the API
 * ask voutbox_acts_for(); the views through voutbox.acts_for(), which asks
 * for the current user.
 *
 * Roles are bound by name: a binding to a role that does not exist grants
 * nothing (pg_dump restores names, and a dropped role's OID may be reused).
 *
 * Each backend caches the bindings, with the roles' OIDs.  A statement
 * trigger on the table sends a relcache invalidation of it, so that every
 * backend, this one included (at the next command), forgets them when a
 * transaction that changed them commits; so does any change of a role.  The
 * cache is read with a catalog snapshot: the latest committed bindings and
 * the current transaction's own, like a system catalog.  While the table
 * does not exist (the SQL objects not yet updated), nothing is cached.
 *
 * The functions of the API are SECURITY INVOKER, so that they know who calls
 * them; after the checks they do their work as the extension's owner, who
 * owns the storage (voutbox_become_owner(), as a SECURITY DEFINER function
 * would).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "voutbox.h"

/* A tenant and the roles bound to it. */
typedef struct TenantEntry
{
	char		tenant_id[VOUTBOX_MAX_NAME_BYTES + 1];
	int			nroles;
	Oid		   *roles;
} TenantEntry;

static MemoryContext bindings_cxt = NULL;
static HTAB *bindings = NULL;
static bool bindings_valid = false;
/* Bumped by every invalidation: one during a load makes it load again. */
static uint64 bindings_generation = 0;
static bool isolation = false;
static Oid	bindings_relid = InvalidOid;

static void
forget_bindings(Datum arg pg_attribute_unused(), Oid relid)
{
	if (relid == InvalidOid || relid == bindings_relid)
	{
		bindings_valid = false;
		bindings_generation++;
	}
}

static void
forget_bindings_of_roles(Datum arg pg_attribute_unused(), int cacheid pg_attribute_unused(),
						 uint32 hashvalue pg_attribute_unused())
{
	bindings_valid = false;
	bindings_generation++;
}

/* The tenant's entry, made if new; NULL for an id longer than the table allows. */
static TenantEntry *
add_tenant(const char *tenant_id)
{
	TenantEntry *e;
	bool		found;

	/* The table's check constraint bounds tenant ids; skip longer ones. */
	if (strlen(tenant_id) > VOUTBOX_MAX_NAME_BYTES)
		return NULL;
	e = hash_search(bindings, tenant_id, HASH_ENTER, &found);
	if (!found)
	{
		e->nroles = 0;
		e->roles = NULL;
	}
	return e;
}

static void
add_binding(const char *tenant_id, Oid role)
{
	TenantEntry *e = add_tenant(tenant_id);

	if (e == NULL)
		return;
	e->roles = e->roles ?
		repalloc(e->roles, sizeof(Oid) * (e->nroles + 1)) :
		MemoryContextAlloc(bindings_cxt, sizeof(Oid));
	e->roles[e->nroles++] = role;
}

/*
 * Read voutbox.tenant_roles into the cache, if it is not valid.  Looking up
 * a role can process invalidations: if one arrives while the table is read
 * (a binding revoked meanwhile), the cache stays invalid and is read again
 * the next time.
 */
static void
load_bindings(void)
{
	uint64		generation = bindings_generation;
	Oid			nsp;
	Relation	rel;
	Snapshot	snapshot;
	TableScanDesc scan;
	TupleTableSlot *slot;
	HASHCTL		ctl;

	if (bindings_valid)
		return;
	if (bindings_cxt == NULL)
	{
		bindings_cxt = AllocSetContextCreate(CacheMemoryContext, "voutbox tenant bindings",
											 ALLOCSET_SMALL_SIZES);
		CacheRegisterRelcacheCallback(forget_bindings, (Datum) 0);
		CacheRegisterSyscacheCallback(AUTHOID, forget_bindings_of_roles, (Datum) 0);
	}
	MemoryContextReset(bindings_cxt);
	ctl.keysize = VOUTBOX_MAX_NAME_BYTES + 1;
	ctl.entrysize = sizeof(TenantEntry);
	ctl.hcxt = bindings_cxt;
	bindings = hash_create("voutbox tenant bindings", 16, &ctl,
						   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	isolation = false;

	/*
	 * Only the extension's functions call this, so its schema and table
	 * exist; an older installation without the table has no bindings.
	 */
	nsp = get_namespace_oid(VOUTBOX_SCHEMA, true);
	bindings_relid = OidIsValid(nsp) ? get_relname_relid("tenant_roles", nsp) : InvalidOid;
	if (!OidIsValid(bindings_relid))
		return;


	rel = table_open(bindings_relid, AccessShareLock);
	snapshot = RegisterSnapshot(GetCatalogSnapshot(bindings_relid));
	scan = table_beginscan(rel, snapshot, 0, NULL);
	slot = table_slot_create(rel, NULL);
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		tenant_null;
		bool		role_null;
		Datum		tenant = slot_getattr(slot, 1, &tenant_null);
		Datum		role = slot_getattr(slot, 2, &role_null);
		Oid			roleid;

		/* Isolation is on whether or not the role exists. */
		isolation = true;
		if (tenant_null || role_null)
			continue;
		/* (A tenant bound to a role that does not exist still owns its topics.) */
		if (!OidIsValid(roleid = get_role_oid(NameStr(*DatumGetName(role)), true)))
		{
			MemoryContext old = MemoryContextSwitchTo(bindings_cxt);

			add_tenant(TextDatumGetCString(tenant));
			MemoryContextSwitchTo(old);
			continue;
		}
		{
			MemoryContext old = MemoryContextSwitchTo(bindings_cxt);

			add_binding(TextDatumGetCString(tenant), roleid);
			MemoryContextSwitchTo(old);
		}
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(rel, AccessShareLock);
	bindings_valid = generation == bindings_generation;
}

/* Whether any binding exists: tenants are isolated from each other. */
bool
voutbox_tenant_isolation(void)
{
	load_bindings();
	return isolation;
}

/* Whether the role acts for every tenant. */
bool
voutbox_acts_for_all(Oid role)
{
	Oid			admin;

	load_bindings();
	if (!isolation || superuser_arg(role))
		return true;
	admin = get_role_oid(VOUTBOX_ADMIN_ROLE, true);
	return OidIsValid(admin) && has_privs_of_role(role, admin);
}

/* Whether the role acts for the tenant. */
bool
voutbox_acts_for(Oid role, const char *tenant_id)
{
	TenantEntry *e;

	if (voutbox_acts_for_all(role))
		return true;
	if (strlen(tenant_id) > VOUTBOX_MAX_NAME_BYTES)
		return false;
	e = hash_search(bindings, tenant_id, HASH_FIND, NULL);
	for (int i = 0; e != NULL && i < e->nroles; i++)
		if (has_privs_of_role(role, e->roles[i]))
			return true;
	return false;
}

/* ERROR unless the current user acts for the tenant. */
void
voutbox_check_acts_for(const char *tenant_id, const char *what)
{
	Oid			role = GetUserId();

	if (!voutbox_acts_for(role, tenant_id))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s for tenant \"%s\"", what, tenant_id),
				 errdetail("Role \"%s\" does not act for that tenant.",
						   GetUserNameFromId(role, false)),
				 errhint("An administrator binds roles to tenants with outbox_tenant_grant().")));
}

/*
 * With tenant isolation on, ERROR if the topic of an event of tenant_id lies
 * among the topics of another tenant of voutbox.tenant_roles: after voutbox.topic_template's
 * literal prefix, the text up to the separator (or "." or "_", which Kafka
 * takes for the same) is that tenant's id.  The template rules keep a
 * tenant's own templates inside its topics; this also covers what they
 * cannot, a template without {tenant_id} ("{event_type}" with event type
 * "acme.orders.v1" from tenant globex).
 */
void
voutbox_check_topic_namespace(const char *tenant_id, const char *topic)
{
	int			prefix_len;
	const char *prefix = voutbox_installation_prefix(&prefix_len);
	char		seps[4] = {voutbox_installation_separator(), '.', '_', '\0'};
	const char *p = topic;
	char	   *owner;

	load_bindings();
	if (!isolation)
		return;
	for (int i = 0; i < prefix_len; i++, p++)
	{
		bool		dot = *p == '.' || *p == '_';

		if (*p == '\0' || (*p != prefix[i] && !(dot && (prefix[i] == '.' || prefix[i] == '_'))))
			return;				/* outside every tenant's topics */
	}
	owner = pnstrdup(p, strcspn(p, seps));
	if (strcmp(owner, tenant_id) == 0 || strlen(owner) > VOUTBOX_MAX_NAME_BYTES ||
		hash_search(bindings, owner, HASH_FIND, NULL) == NULL)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("the topic \"%s\" of an event of tenant \"%s\" is among the topics of tenant \"%s\"",
					topic, tenant_id, owner),
			 errdetail("With tenant isolation on, the topics that begin with a tenant's id and \"%c\" are that tenant's.",
					   seps[0]),
			 errhint("Change the arguments that the topic template puts into the topic, or the template.")));
}

/* ---------------------------------------------------------------------
 * Acting as the extension's owner
 * ---------------------------------------------------------------------
 */

/*
 * Switch to the owner of the called function (the extension's owner, a
 * superuser) the way a SECURITY DEFINER function does; an ERROR restores
 * the caller with the (sub)transaction's abort.
 */
void
voutbox_become_owner(FunctionCallInfo fcinfo, Oid *save_user, int *save_sec)
{
	FmgrInfo   *flinfo = fcinfo->flinfo;
	Oid		   *owner = (Oid *) flinfo->fn_extra;

	if (owner == NULL)
	{
		HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(flinfo->fn_oid));

		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for function %u", flinfo->fn_oid);
		owner = MemoryContextAlloc(flinfo->fn_mcxt, sizeof(Oid));
		*owner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
		ReleaseSysCache(tup);
		flinfo->fn_extra = owner;
	}
	GetUserIdAndSecContext(save_user, save_sec);
	SetUserIdAndSecContext(*owner, *save_sec | SECURITY_LOCAL_USERID_CHANGE);
}

void
voutbox_restore_user(Oid save_user, int save_sec)
{
	SetUserIdAndSecContext(save_user, save_sec);
}

/* ---------------------------------------------------------------------
 * SQL functions
 * ---------------------------------------------------------------------
 */

PG_FUNCTION_INFO_V1(voutbox_sql_acts_for);

/* voutbox.acts_for(tenant_id text): for the current user. */
Datum
voutbox_sql_acts_for(PG_FUNCTION_ARGS)
{
	char	   *tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_BOOL(voutbox_acts_for(GetUserId(), tenant_id));
}

PG_FUNCTION_INFO_V1(voutbox_sql_acts_for_all);

Datum
voutbox_sql_acts_for_all(PG_FUNCTION_ARGS pg_attribute_unused())
{
	PG_RETURN_BOOL(voutbox_acts_for_all(GetUserId()));
}

PG_FUNCTION_INFO_V1(voutbox_sql_role_acts_for);

/* voutbox.role_acts_for(role oid, tenant_id text): not executable by PUBLIC. */
Datum
voutbox_sql_role_acts_for(PG_FUNCTION_ARGS)
{
	char	   *tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(1));

	PG_RETURN_BOOL(voutbox_acts_for(PG_GETARG_OID(0), tenant_id));
}

PG_FUNCTION_INFO_V1(voutbox_tenant_roles_changed);

/*
 * Statement trigger on a table that every backend caches
 * (voutbox.tenant_roles, and voutbox.routes: routes.c): the caches go.
 */
Datum
voutbox_tenant_roles_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "voutbox: %s is a trigger function", get_func_name(fcinfo->flinfo->fn_oid));
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}
