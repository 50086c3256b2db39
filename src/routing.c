/*-------------------------------------------------------------------------
 *
 * routing.c
 *		Topic and key templates.
 *
 * voutbox.topic_template and voutbox.key_template name an event's topic
 * and message key with placeholders such as {tenant_id}.  outbox_save()
 * renders both when the event is saved, so that a topic Kafka would refuse
 * is an ERROR for the caller rather than a dead letter later, and so that
 * changing a template never reroutes events already saved.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"

#include "voutbox.h"


typedef enum RouteField
{
	FIELD_TENANT_ID,
	FIELD_AGGREGATE_TYPE,
	FIELD_AGGREGATE_ID,
	FIELD_EVENT_TYPE,
	FIELD_EVENT_VERSION
} RouteField;

static const struct
{
	const char *name;
	RouteField	field;
}			placeholders[] =
{
	{"tenant_id", FIELD_TENANT_ID},
	{"aggregate_type", FIELD_AGGREGATE_TYPE},
	{"aggregate_id", FIELD_AGGREGATE_ID},
	{"event_type", FIELD_EVENT_TYPE},
	{"event_version", FIELD_EVENT_VERSION},
};

/*
 * Find the placeholder that starts at "p" (just after a '{').  Returns its
 * index in placeholders[] and sets *len to the length of its name, or
 * returns -1.
 */
static int
lookup_placeholder(const char *p, int *len)
{
	for (int i = 0; i < (int) lengthof(placeholders); i++)
	{
		int			n = strlen(placeholders[i].name);

		if (strncmp(p, placeholders[i].name, n) == 0 && p[n] == '}')
		{
			*len = n;
			return i;
		}
	}
	return -1;
}

bool
voutbox_template_is_valid(const char *tmpl, const char **detail)
{
	if (tmpl == NULL)
		return true;
	for (const char *p = tmpl; *p; p++)
	{
		int			len;

		if (*p == '}')
		{
			*detail = "A \"}\" appears without a matching \"{\".";
			return false;
		}
		if (*p != '{')
			continue;
		if (lookup_placeholder(p + 1, &len) < 0)
		{
			*detail = "Placeholders are {tenant_id}, {aggregate_type}, {aggregate_id}, {event_type} and {event_version}.";
			return false;
		}
		p += len + 1;
	}
	return true;
}

char *
voutbox_render_template(const char *tmpl, const VoutboxRouteFields *fields)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (const char *p = tmpl; *p; p++)
	{
		int			len;
		int			i;

		if (*p != '{' || (i = lookup_placeholder(p + 1, &len)) < 0)
		{
			appendStringInfoChar(&buf, *p);
			continue;
		}
		switch (placeholders[i].field)
		{
			case FIELD_TENANT_ID:
				appendStringInfoString(&buf, fields->tenant_id);
				break;
			case FIELD_AGGREGATE_TYPE:
				appendStringInfoString(&buf, fields->aggregate_type);
				break;
			case FIELD_AGGREGATE_ID:
				appendStringInfoString(&buf, fields->aggregate_id);
				break;
			case FIELD_EVENT_TYPE:
				appendStringInfoString(&buf, fields->event_type);
				break;
			case FIELD_EVENT_VERSION:
				appendStringInfo(&buf, "%d", fields->event_version);
				break;
		}
		p += len + 1;
	}
	return buf.data;
}

/* The rules of Kafka's Topic.validate(). */
bool
voutbox_topic_is_valid(const char *topic, const char **detail)
{
	size_t		len = strlen(topic);

	if (len == 0)
	{
		*detail = "The topic would be empty.";
		return false;
	}
	if (len > VOUTBOX_TOPIC_MAX_LEN)
	{
		*detail = "Kafka topic names are at most 249 characters long.";
		return false;
	}
	if (strcmp(topic, ".") == 0 || strcmp(topic, "..") == 0)
	{
		*detail = "Kafka does not accept \".\" or \"..\" as a topic name.";
		return false;
	}
	for (const char *p = topic; *p; p++)
	{
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			  (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-'))
		{
			*detail = "Kafka topic names may contain only ASCII letters, digits, \".\", \"_\" and \"-\".";
			return false;
		}
	}
	return true;
}

/*
 * The character that follows the first {tenant_id} of a topic template, or
 * '\0' when {tenant_id} ends the template or is not in it.  Tenant ids must
 * not contain it: then no two tenants can render the same topic.
 */
char
voutbox_tenant_separator(const char *tmpl)
{
	const char *t = tmpl ? strstr(tmpl, "{tenant_id}") : NULL;

	return t ? t[strlen("{tenant_id}")] : '\0';
}

/*
 * Whether the topics of two tenants always differ: {tenant_id} comes before
 * any other placeholder (so what precedes it is fixed) and is followed by a
 * literal character, which tenant ids then may not contain, or ends the
 * template.  A template without {tenant_id} shares its topics between all
 * tenants, which is a choice, not an accident.
 */
bool
voutbox_topic_template_separates_tenants(const char *tmpl, const char **detail)
{
	const char *t = tmpl ? strstr(tmpl, "{tenant_id}") : NULL;
	const char *first = tmpl ? strchr(tmpl, '{') : NULL;

	if (t == NULL)
		return true;
	if (first != t)
	{
		*detail = "{tenant_id} is not the first placeholder: what comes before it varies, so two tenants could render the same topic.";
		return false;
	}
	if (voutbox_tenant_separator(tmpl) == '{')
	{
		*detail = "{tenant_id} is followed directly by another placeholder: two tenants could render the same topic.";
		return false;
	}
	return true;
}

/*
 * The character that ends the tenant id in every topic template: the one
 * voutbox.topic_template puts after {tenant_id}, or "." if it has none.
 */
char
voutbox_installation_separator(void)
{
	char		sep = voutbox_tenant_separator(voutbox_topic_template);

	return sep != '\0' && sep != '{' ? sep : '.';
}

/*
 * What voutbox.topic_template puts before {tenant_id} (a literal prefix,
 * separates_tenants() says), or "" if it does not name the tenant.
 */
const char *
voutbox_installation_prefix(int *len)
{
	const char *t = voutbox_topic_template ? strstr(voutbox_topic_template, "{tenant_id}") : NULL;

	*len = t ? (int) (t - voutbox_topic_template) : 0;
	return t ? voutbox_topic_template : "";
}

/* How messages name a topic template: a route's (route not NULL) or the setting. */
char *
voutbox_topic_template_desc(const char *route, const char *tmpl)
{
	return route ? psprintf("the topic template \"%s\" of route \"%s\"", tmpl, route) :
		psprintf("voutbox.topic_template \"%s\"", tmpl);
}
