# Fuzz test of outbox_save(): 10,000 calls with random and hostile arguments
# (NULL, empty, whitespace, huge, unicode, control characters, SQL quoting,
# odd event types and versions, deep, huge and malformed JSON, bad trace ids,
# odd pii_fields and timestamps, repeated idempotency keys, tenants that make
# the topic invalid), all 15 arguments in named notation.
#
# Every call must either return an event id or raise a clean ERROR: never an
# internal error (XX000-XX002), a timeout or a lost connection, and the
# server must not crash.  A Perl model of README's rules (checked in
# save.c's order) predicts each call's outcome; an ERROR raised by voutbox
# itself must name the argument at fault (an error of PostgreSQL's own, such
# as a malformed literal or a JSON document nested too deeply for the stack,
# must just be an ERROR with a message).  The text arguments have limits in
# bytes of UTF-8 (names 255, keys 1024): values just under, at and just over
# them, with multi-byte characters straddling the limit and incompressible
# random keys, must be saved, or refused with 22001 naming the argument, the
# limit and the length.  Afterwards every saved event is in the outbox view
# with the arguments it was given, and repeated idempotency keys returned
# the first event's id.
#
# The calls are random but reproducible: the seed is logged, and
# VOUTBOX_FUZZ_SEED=<seed> repeats a run.  The calls of the last run are
# kept in tmp_check/fuzz_calls.sql, one per line (the line numbers of
# fuzz_calls.stderr point into it).
use strict;
use warnings;
use utf8;

use Encode qw(decode_utf8 encode_utf8);
use File::Basename qw(dirname);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use VoutboxTest;

my $CALLS = 10_000;
my $MAX_PAYLOAD = 512 * 1024;    # voutbox.max_payload_bytes, default
# Longest text arguments, in bytes of UTF-8 (README, "Bad input"; voutbox.h):
# beyond, 22001 "<argument> is longer than <limit> bytes".  The message key
# rendered from voutbox.key_template ({aggregate_id} by default) has the
# limit of the keys.
my $NAME_BYTES = 255;
my $KEY_BYTES = 1024;
my %MAX_BYTES = (
	tenant_id => $NAME_BYTES, aggregate_type => $NAME_BYTES, event_type => $NAME_BYTES,
	trace_id => $NAME_BYTES, producer => $NAME_BYTES,
	aggregate_id => $KEY_BYTES, idempotency_key => $KEY_BYTES, correlation_id => $KEY_BYTES);
my $MB = 1024 * 1024;
my $TIMEOUT = '10s';             # the budget of one call

my $seed = $ENV{VOUTBOX_FUZZ_SEED} // 20261128;
die "VOUTBOX_FUZZ_SEED must be a number" unless $seed =~ /^\d+$/;
srand($seed);
note("fuzz seed $seed (VOUTBOX_FUZZ_SEED=$seed repeats this run)");

my @ARGS = qw(tenant_id aggregate_type aggregate_id event_type payload event_version
  metadata idempotency_key correlation_id trace_id pii pii_fields consent producer
  scheduled_for);

# ---------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------

sub pick { return $_[ int(rand(@_)) ] }
sub chance { return rand() < $_[0] }

# wpick([weight, sub], ...): call one of the subs, chosen by weight.
sub wpick
{
	my $total = 0;
	$total += $_->[0] for @_;
	my $r = rand($total);
	for (@_)
	{
		return $_->[1]->() if ($r -= $_->[0]) < 0;
	}
	return $_[-1][1]->();
}

sub bytes { return length(encode_utf8($_[0])) }

my @LOWER = ('a' .. 'z');
my @WORDCHARS = ('a' .. 'z', 'A' .. 'Z', '0' .. '9', '_', '-');
sub lword { my $s = ''; $s .= $LOWER[ rand @LOWER ] for 0 .. int(rand(10)); return $s }
sub word { my $s = ''; $s .= $WORDCHARS[ rand @WORDCHARS ] for 0 .. int(rand($_[0] // 10)); return $s }

my @UNICODE = (
	"é", "e\x{301}", "\x{202E}gnp.exe", "שלום", "مرحبا", "😀",
	"\x{1F468}\x{200D}\x{1F469}\x{200D}\x{1F467}", "\x{FFFF}", "\x{FFFE}", "\x{10FFFF}",
	"\x{FEFF}bom", "zero\x{200B}width", "中文字符", "ﬁ", "İstanbul", "line\x{2028}sep",
	"nel\x{85}", "Ω≈ç√∫", "𝕬𝖇𝖈", "\x{E000}private", "a\x{338}", "ＦＵＬＬ", "\x{A0}");
my @CONTROL = ("\n", "\r\n", "\t", "\x01", "\x1b[31mred\x1b[0m", "\x7f", "a\x08b", "\x0b\x0c", "\x1f");
my @SQLISH = (
	"'", "''", "'; DROP TABLE voutbox.events; --", "Robert'); DROP TABLE students;--",
	"\\", "\\'", '"', '$$', '$x$ $x$', "E'\\x00'", '%s%s%s%n', '%d %x %p %.9999s',
	'{tenant_id}', '{event_type}.{', 'NULL', 'null', '\\N', '--', '/*', ':var', ":'var'",
	'\\echo hi', '\\!', '0', '-1', ';');
my @SPACE = (' ', '  ', "\t", "\n", " \t\n ", "\x{A0}", "\x{3000}", "\x{2003}");

my @PIECES = (@UNICODE, @CONTROL, @SQLISH, @SPACE);
sub piece { return chance(0.3) ? word() : $PIECES[ int(rand(@PIECES)) ] }

# A string as an SQL literal: an E'' string with escaped quotes, backslashes
# and control characters, and non-ASCII characters either as they are or
# (sometimes) as \u escapes.
sub sql_text
{
	my ($s) = @_;
	return 'NULL' unless defined $s;
	(my $lit = $s) =~ s/(['\\\x00-\x1f\x7f])/
	  $1 eq "'" ? "''" : $1 eq "\\" ? "\\\\" : sprintf('\\x%02x', ord $1)/ge;
	$lit =~ s/([^\x00-\x7f])/ord($1) > 0xffff ? sprintf('\\U%08x', ord $1) : sprintf('\\u%04x', ord $1)/ge
	  if chance(0.3);
	return "E'$lit'";
}

# A string as JSON text.
sub json_uesc
{
	my ($o) = @_;
	return sprintf('\\u%04x', $o) if $o <= 0xffff;
	$o -= 0x10000;
	return sprintf('\\u%04x\\u%04x', 0xd800 + ($o >> 10), 0xdc00 + ($o & 0x3ff));
}

sub json_str
{
	my ($s) = @_;
	$s =~ s/(["\\\x00-\x1f])/$1 eq '"' ? '\\"' : $1 eq "\\" ? '\\\\' : sprintf('\\u%04x', ord $1)/ge;
	$s =~ s/([^\x00-\x7f])/json_uesc(ord $1)/ge if chance(0.3);
	return "\"$s\"";
}

# ---------------------------------------------------------------------------
# Argument specs.  Each has the SQL of the argument ("sql"), the SQLSTATEs
# that evaluating it may raise before outbox_save runs ("in"; "sure" when it
# always does), and what the model needs: "val" for text (undef: NULL),
# "null"/"object"/"len" for jsonb (len: bytes of its JSON text), and so on.
# ---------------------------------------------------------------------------

sub t_val { return { sql => sql_text($_[0]), val => $_[0] } }
sub t_null { return { sql => 'NULL', val => undef, null => 1 } }

# unit repeated to about $bytes bytes, built by the server
sub t_rep
{
	my ($unit, $bytes) = @_;
	my $n = int($bytes / bytes($unit)) || 1;
	return { sql => 'repeat(' . sql_text($unit) . ", $n)", val => $unit x $n };
}

# the same as one literal in the statement
sub t_lit_huge
{
	my ($unit, $bytes) = @_;
	my $n = int($bytes / bytes($unit)) || 1;
	my $lit = sql_text($unit) =~ s/^E'(.*)'$/$1/sr;
	return { sql => "E'" . ($lit x $n) . "'", val => $unit x $n };
}

sub bad { my ($sql, $code) = @_; return { sql => $sql, val => 'x', in => [$code], sure => 1 } }

# SQL that fails before the function is called, whatever the parameter type.
my @GENERIC_BAD = (
	[ "E'ab\\x00cd'", '22021' ],    # NUL is not allowed in text
	[ "E'\\u0000'", '42601' ],
	[ "E'\\uD800'", '42601' ],      # lone surrogate
	[ "U&'\\D800'", '42601' ],
	[ "E'\\xff'", '22021' ],        # invalid UTF-8
	[ "E'\\xc3'", '22021' ],        # truncated UTF-8
	[ "E'\\U00110000'", '42601' ],  # beyond Unicode
);
sub generic_bad { return bad(@{ pick(@GENERIC_BAD) }) }

# Any non-empty text: short and odd, or long, or huge.
sub any_text
{
	return wpick(
		[ 30, sub { t_val(wpick([ 1, \&lword ], [ 1, \&word ], [ 1, sub { word(40) } ],
			[ 1, sub { pick('lead', 'order', '42', '0') } ])) } ],
		[ 12, sub { t_val(pick(@UNICODE)) } ],
		[ 6, sub { t_val(pick(@CONTROL)) } ],
		[ 8, sub { t_val(pick(@SQLISH)) } ],
		[ 5, sub { t_val(pick(@SPACE)) } ],
		[ 10, sub { t_val(join '', map { piece() } 0 .. 1 + int(rand(4))) } ],
		[ 3, sub { t_val(join '', map { piece() } 0 .. 50 + int(rand(500))) } ],
		[ 0.5, sub { t_rep(pick('x', 'é', '😀', "\x{FFFF}", "'", "\\", "\n", 'ab '), 100 * 1024) } ],
		[ 0.15, sub { t_rep(pick('x', 'é', '😀', "\x{10FFFF}", "'", "\n"), $MB) } ],
		[ 0.01, sub { t_lit_huge(pick('y', 'ü', "'\\"), $MB) } ],
		[ 4, sub { near_limit(pick($NAME_BYTES, $KEY_BYTES), pick('under', 'over')) } ]);
}

# ---- texts of about the length limits ----------------------------------------

# multi-byte characters (2, 2, 3, 3, 3, 4, 4 bytes; a combining sequence)
my @WIDE = ('é', "\x{A0}", '中', '€', "\x{FFFF}", '😀', "\x{10FFFF}", "e\x{301}");

sub rand_word_chars { return join '', map { $WORDCHARS[ rand @WORDCHARS ] } 1 .. $_[0] }

# A random character of 1 to 4 bytes (no control character, no surrogate).
sub rand_char
{
	my $w = 1 + int(rand(4));
	return chr(
		  $w == 1 ? 0x20 + int(rand(0x5f))
		: $w == 2 ? 0xa0 + int(rand(0x800 - 0xa0))
		: $w == 3 ? 0x800 + int(rand(0xd800 - 0x800))
		:           0x10000 + int(rand(0x100000)));
}

# Random text of exactly $n bytes that does not compress.
sub random_text
{
	my ($n) = @_;
	my ($s, $b) = ('', 0);
	while ($b < $n)
	{
		my $ch = rand_char();
		my $cb = bytes($ch);
		($ch, $cb) = ($WORDCHARS[ rand @WORDCHARS ], 1) if $b + $cb > $n;
		$s .= $ch;
		$b += $cb;
	}
	return $s;
}

# Text of exactly $limit - 1 or $limit bytes (side 'under'), or of $limit + 1
# to $limit + 3 bytes ('over'), often ending in a multi-byte character that
# straddles the limit (fewer characters than the limit, more bytes).
sub near_limit
{
	my ($limit, $side) = @_;
	my $n = $limit + ($side eq 'over' ? pick(1, 1, 2, 3) : pick(-1, 0, 0));
	return wpick(
		[ 2, sub { t_val(rand_word_chars($n)) } ],
		# ASCII, then a multi-byte character that ends at byte $n
		[ 3, sub { my $u = pick(@WIDE); t_val(rand_word_chars($n - bytes($u)) . $u) } ],
		# multi-byte characters (after an ASCII head of less than one)
		[ 2, sub {
			my $u = pick(@WIDE);
			my $k = int($n / bytes($u));
			t_val(('x' x ($n - $k * bytes($u))) . ($u x $k)) } ],
		[ 3, sub { t_val(random_text($n)) } ],
		# repeat() on the server (a multi-byte unit may not fill $n exactly)
		[ 1, sub { t_rep(pick('x', "'", @WIDE), $n) } ]);
}

# Text over the limit: mostly just over, sometimes far over.
sub over_limit
{
	my ($limit) = @_;
	return wpick(
		[ 6, sub { near_limit($limit, 'over') } ],
		[ 1, sub { t_val(random_text($limit + 1 + int(rand(4 * $limit)))) } ],
		[ 1, sub { t_rep(pick('x', 'é', '😀'), 100 * 1024) } ]);
}

# text argument that may be NULL (default) but not empty
sub optional_text
{
	my ($want, $name) = @_;
	my $limit = $MAX_BYTES{$name} or die "no limit for $name";
	return wpick([ 50, sub { undef } ], [ 10, \&t_null ], [ 40, \&any_text ],
		[ 4, sub { near_limit($limit, 'under') } ])
	  if $want eq 'valid';
	return wpick([ 6, sub { t_val('') } ], [ 3, \&generic_bad ],
		[ 1, sub { bad('42', '42883') } ], [ 5, sub { over_limit($limit) } ]);
}

# required text argument
sub required_text
{
	my ($want, $name) = @_;
	my $limit = $MAX_BYTES{$name} or die "no limit for $name";
	return wpick([ 100, \&any_text ], [ 5, sub { near_limit($limit, 'under') } ])
	  if $want eq 'valid';
	return wpick(
		[ 5, \&t_null ],
		[ 5, sub { t_val('') } ],
		[ 3, \&generic_bad ],
		[ 1, sub { bad('42', '42883') } ],
		[ 1, sub { bad("'x'::bytea", '42883') } ],
		[ 1, sub { +{ omit => 1, in => ['42883'], sure => 1 } } ],
		[ 5, sub { over_limit($limit) } ]);
}

my @TENANTS = ('acme', 'globex', 'initech', 't-1', 'T_2', '-', '_', '0', 'A');

sub gen_tenant
{
	my ($want) = @_;
	if ($want eq 'valid')
	{
		return wpick(
			[ 60, sub { t_val(pick(@TENANTS)) } ],
			[ 30, sub { t_val(join '', map { pick(@WORDCHARS) } 0 .. int(rand(30))) } ],
			[ 5, sub { t_val('t' x (100 + int(rand(150)))) } ]);
	}
	return wpick(
		[ 20, sub { required_text('invalid', 'tenant_id') } ],
		[ 5, sub { t_val(pick('.', '..')) } ],
		# the separator after {tenant_id} in the topic template
		[ 5, sub { t_val(pick('a.b', '...', 'acme.lead', 'x.', '.x')) } ],
		[ 30, \&any_text ],    # mostly characters Kafka refuses
		[ 5, sub { t_val('t' x (250 + int(rand(50)))) } ],
		# characters of topics: too long for a topic, or for the limit
		[ 4, sub { t_val(rand_word_chars($NAME_BYTES + pick(-6, -1, 0, 1, 2))) } ],
		[ 4, sub { near_limit($NAME_BYTES, pick('under', 'over')) } ],
		[ 1, sub { t_rep('t', $MB) } ]);
}

# event_type: name.vN
my @BAD_EVENT_TYPES = (
	'a.v0', 'x.v-1', 'x.v99999999999', '.v1', 'a..b.v1', 'a.v01', 'a.V1', 'a.v1 ', ' a.v1', 'a.v1.',
	'v1', 'a', 'a.b', 'é.v1', 'a/b.v1', 'a.v', 'a.v+1', 'a.v1e3', "a.v\x{661}", "a.v1\n",
	'a.v2147483648', 'a.b..v1', 'a.v 1', "a.v1\x{200B}", 'a. v1', 'a .v1', '..v1', 'a.v1.v',
	'.', '..', 'a.vv1', 'lead.created', 'lead created.v1', "lead.created.v1'", '{event_type}.v1');

sub valid_event_type
{
	my @words = map { pick(lword(), lword(), word(12), 'v1', '-', '_', '0', 'lead', 'created') }
	  0 .. int(rand(4));
	my $v = pick(1, 1, 1, 2, 3, 1 + int(rand(1000)), 2147483647, 1 + int(rand(2147483647)));
	return join('.', @words) . ".v$v";
}

sub gen_event_type
{
	my ($want) = @_;
	if ($want eq 'valid')
	{
		return wpick(
			[ 90, sub { t_val(valid_event_type()) } ],
			[ 5, sub { t_val(('e' x (240 + int(rand(10)))) . '.v1') } ],
			[ 3, sub { t_val(event_type_of($NAME_BYTES + pick(-1, 0))) } ]);
	}
	return wpick(
		[ 10, sub { required_text('invalid', 'event_type') } ],
		[ 50, sub { t_val(pick(@BAD_EVENT_TYPES)) } ],
		[ 20, \&any_text ],
		# the length is checked before the form
		[ 5, sub { t_val(event_type_of($NAME_BYTES + pick(1, 2, 3))) } ],
		[ 3, sub { t_val(event_type_of($NAME_BYTES + pick(-1, 0, 1, 2), pick(@WIDE))) } ],
		[ 0.5, sub { my $s = t_rep('e', $MB); $s->{sql} .= " || '.v7'"; $s->{val} .= '.v7'; $s } ]);
}

# An event type of exactly $n bytes of the form name.vN, but for $odd (a
# character not allowed in a name) at the end of the name if given.
sub event_type_of
{
	my ($n, $odd) = @_;
	$odd //= '';
	my $suffix = '.v' . pick(1, 7, 42, 2147483647);
	my $len = $n - length($suffix) - bytes($odd);
	my $name = $len % 2 ? 'e' : 'ee';
	$name .= pick('ab', '.c', '_-', 'd9') while length($name) < $len;
	return $name . $odd . $suffix;
}

# The version in a valid event_type (the model of parse_event_type()).
sub event_type_version
{
	my ($et) = @_;
	return undef unless defined $et;
	return undef unless $et =~ /\A[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.v([1-9][0-9]*)\z/;
	my $n = $1;
	return undef if length($n) > 10 || (length($n) == 10 && $n gt '2147483647');
	return $n + 0;
}

sub gen_event_version
{
	my ($want, $n) = @_;
	my $other = defined $n ? ($n == 2147483647 ? 1 : $n + 1) : 1 + int(rand(5));
	if ($want eq 'valid')
	{
		return wpick(
			[ 70, sub { undef } ],
			[ 10, sub { +{ sql => 'NULL', val => undef } } ],
			[ 15, sub { defined $n ? { sql => $n, val => $n } : undef } ],
			[ 5, sub { defined $n ? { sql => "' $n '", val => $n } : undef } ]);
	}
	return wpick(
		[ 20, sub { +{ sql => $other, val => $other } } ],
		[ 5, sub { +{ sql => 0, val => 0 } } ],
		[ 5, sub { +{ sql => -1, val => -1 } } ],
		[ 3, sub { +{ sql => '(-2147483647 - 1)', val => -2147483648 } } ],
		[ 3, sub { bad("'99999999999'", '22003') } ],
		[ 3, sub { bad('99999999999', '42883') } ],    # a bigint
		[ 3, sub { bad("'abc'", '22P02') } ],
		[ 2, sub { bad("'1.5'", '22P02') } ],
		[ 2, sub { bad('1.5', '42883') } ],            # a numeric
		[ 2, sub { bad("''", '22P02') } ],
		[ 2, \&generic_bad ]);
}

# ---- JSON ------------------------------------------------------------------

my @NUMBERS = ('0', '-0', '1', '-1', '0.10', '1e3', '1E-3', '123456789012345678901234567890',
	'3.14159265358979323846264338327950288', '1e308', '-1e-308', '1e1000', '2.5e-50');

# Small random JSON text; returns (text, top level is an object).
sub rand_json
{
	my ($depth, $force_object) = @_;
	my $r = $force_object ? 1 : rand();
	if (!$force_object && ($depth <= 0 || $r < 0.4))
	{
		my $s = rand();
		return (json_str(pick(lword(), @UNICODE, @CONTROL, @SQLISH, @SPACE, piece() . piece())), 0)
		  if $s < 0.5;
		return (pick(@NUMBERS), 0) if $s < 0.8;
		return (pick('true', 'false', 'null'), 0);
	}
	my $n = int(rand(5));
	my $ws = pick('', ' ', "\n", "\t ");
	if ($r < 0.7)
	{
		return ('[' . join(",$ws", map { (rand_json($depth - 1))[0] } 1 .. $n) . ']', 0);
	}
	return ('{' . join(",$ws", map {
		json_str(pick(lword(), @UNICODE, @SQLISH, @SPACE, '', 'dup', 'dup')) . ":$ws"
		  . (rand_json($depth - 1))[0] } 1 .. $n) . '}', 1);
}

sub j_lit
{
	my ($text, $object) = @_;
	return { sql => sql_text($text), object => $object, len => bytes($text) };
}
sub j_expr { my ($sql, $object, $len, @in) = @_; return { sql => $sql, object => $object, len => $len, in => \@in } }
sub j_null { return { sql => 'NULL', null => 1 } }

# Digits of 1 .. n.
sub digits_upto
{
	my ($n) = @_;
	my ($sum, $lo) = (0, 1);
	for (my $d = 1; $lo <= $n; $d++, $lo *= 10)
	{
		my $hi = $lo * 10 - 1;
		$hi = $n if $hi > $n;
		$sum += $d * ($hi - $lo + 1);
	}
	return $sum;
}

# Nesting deeper than this may exceed the stack depth limit (54001).
my $SAFE_DEPTH = 1000;
sub deep_in { return $_[0] > $SAFE_DEPTH ? ('54001') : () }

# JSON of a size that matters: the JSON text's length is computed exactly
# (as PostgreSQL prints jsonb) for the payload limit, which is checked on it.
sub json_big
{
	my @units = ([ 'x', 1 ], [ 'é', 2 ], [ '😀', 4 ], [ "\n", 2 ], [ "\x01", 6 ], [ '"', 2 ]);
	return wpick(
		# deep arrays, objects, both
		[ 4, sub {
			my $d = pick(10, 100, 1000, 5000, 10000, 100000, 1000000);
			j_expr("(repeat('[', $d) || repeat(']', $d))::jsonb", 0, 2 * $d, deep_in($d)) } ],
		[ 4, sub {
			my $d = pick(10, 100, 1000, 5000, 20000, 100000);
			j_expr(qq{(repeat('{"a": ', $d) || '1' || repeat('}', $d))::jsonb}, 1, 7 * $d + 1, deep_in($d)) } ],
		[ 2, sub {
			my $d = pick(10, 1000, 3000, 50000);
			j_expr(qq{(repeat('[{"k": ', $d) || 'null' || repeat('}]', $d))::jsonb}, 0, 9 * $d + 4, deep_in(2 * $d)) } ],
		[ 1, sub {
			my $d = pick(500, 5000);
			+{ %{ j_lit(('[' x $d) . (']' x $d), 0) }, in => [ deep_in($d) ] } } ],
		# a string just under, at or just over the limit: {"b": "..."}
		[ 3, sub {
			my ($u, $ub) = @{ pick(@units) };
			my $n = int(($MAX_PAYLOAD - 9) / $ub) + pick(-1000, -1, 0, 0, 1, 1, 2, 1000);
			j_expr('jsonb_build_object(' . "'b', repeat(" . sql_text($u) . ", $n))", 1, 9 + $n * $ub) } ],
		[ 1, sub {
			my ($u, $ub) = @{ pick(@units) };
			my $n = int(($MAX_PAYLOAD - 2) / $ub) + pick(-1, 0, 1);
			j_expr('to_jsonb(repeat(' . sql_text($u) . ", $n))", 0, 2 + $n * $ub) } ],
		# huge arrays and objects
		[ 0.6, sub {
			my $n = pick(1000, 50000, 70000, 75000, 100000);
			j_expr("(SELECT jsonb_agg(g) FROM generate_series(1, $n) g)", 0,
				2 + digits_upto($n) + 2 * ($n - 1)) } ],
		[ 0.3, sub {
			my $n = pick(1000, 20000, 40000, 100000);
			j_expr("(SELECT jsonb_object_agg('k' || g, g) FROM generate_series(1, $n) g)", 1,
				2 + 5 * $n + 2 * digits_upto($n) + 2 * ($n - 1)) } ],
		# a short text that prints long: 1e100000 is 100001 digits
		[ 1, sub {
			my $k = pick(1, 5, 6);
			+{ sql => sql_text('[' . join(',', ('1e100000') x $k) . ']'), object => 0,
			  len => 2 + $k * 100001 + 2 * ($k - 1) } } ]);
}

my @JSON_CONSTANTS = ('null', '0', '-0', '""', '"x"', 'true', 'false', '[]', '{}', '1e308',
	'0.10', '123456789012345678901234567890.123456789', '{"dup": 1, "dup": 2}', '{"": ""}',
	'"\\ud83d\\ude00"', '{"\\u00e9": "\\uffff"}', "  {\"ws\" :\n[ 1 , 2 ] }\t", '[[[[[]]]]]',
	'{"a": {"b": [1, {"c": null}]}}', '"\\u0001\\b\\f\\n\\r\\t\\\\\\"\\/"');

sub json_valid
{
	return wpick(
		[ 40, sub { j_lit(rand_json(3)) } ],
		[ 10, sub { my $t = pick(@JSON_CONSTANTS); j_lit($t, $t =~ /^\s*\{/ ? 1 : 0) } ],
		[ 8, \&json_big ]);
}

sub json_object
{
	return wpick(
		[ 40, sub { j_lit(rand_json(3, 1)) } ],
		[ 3, sub { my $d = pick(100, 1000, 5000, 20000);
				j_expr(qq{(repeat('{"a": ', $d) || '1' || repeat('}', $d))::jsonb}, 1, 0, deep_in($d)) } ],
		[ 0.5, sub { my $n = pick(1000, 100000);
				j_expr("(SELECT jsonb_object_agg('k' || g, repeat('v', 10)) FROM generate_series(1, $n) g)", 1, 0) } ],
		[ 1, sub { j_expr("jsonb_build_object('blob', repeat('m', $MB))", 1, 0) } ]);
}

my @JSON_BAD = (
	[ '"\\u0000"', '22P05' ], [ '{"a": "\\ud800"}', '22P02' ], [ '{"a":1,}', '22P02' ],
	[ '', '22P02' ], [ 'nul', '22P02' ], [ '{"a":1}{', '22P02' ], [ "{'a':1}", '22P02' ],
	[ '1e1000000', '22003' ], [ 'NaN', '22P02' ], [ '[1,2', '22P02' ], [ '"\\x41"', '22P02' ],
	[ "\"raw\ncontrol\"", '22P02' ], [ '{"a" 1}', '22P02' ], [ '01', '22P02' ], [ ' ', '22P02' ],
	[ '{"a": 1', '22P02' ], [ ('[' x 3000), '22P02' ]);

sub json_bad
{
	return wpick(
		[ 10, sub { my ($t, $c) = @{ pick(@JSON_BAD) }; bad(sql_text($t), $c) } ],
		[ 2, \&generic_bad ],
		[ 1, sub { bad("'{}'::json", '42883') } ],
		[ 1, sub { bad("'x'::text", '42883') } ],
		[ 1, sub { bad('42', '42883') } ]);
}

sub gen_payload
{
	my ($want) = @_;
	return json_valid() if $want eq 'valid';
	return wpick(
		[ 5, \&j_null ],
		[ 5, sub {
			my $n = $MAX_PAYLOAD - 9 + pick(1, 2, 100, 10000, $MAX_PAYLOAD);
			j_expr("jsonb_build_object('b', repeat('z', $n))", 1, 9 + $n) } ],
		[ 2, sub {
			j_expr("jsonb_build_object('b', repeat('ü', $MB))", 1, 9 + 2 * $MB) } ],
		[ 3, \&json_big ],
		[ 8, \&json_bad ],
		[ 1, sub { +{ omit => 1, in => ['42883'], sure => 1 } } ]);
}

sub gen_metadata
{
	my ($want) = @_;
	return wpick([ 50, sub { undef } ], [ 10, \&j_null ], [ 40, \&json_object ])
	  if $want eq 'valid';
	return wpick(
		[ 10, sub { my $t = pick('[1, 2]', '[]', 'null', '"{}"', '0', 'true', '"x"'); j_lit($t, 0) } ],
		[ 6, sub { my ($t) = rand_json(2); j_lit("[$t]", 0) } ],
		[ 2, sub { my $d = pick(100, 10000); j_expr("(repeat('[', $d) || repeat(']', $d))::jsonb", 0, 0, deep_in($d)) } ],
		[ 5, \&json_bad ]);
}

sub gen_consent
{
	my ($want) = @_;
	return wpick([ 60, sub { undef } ], [ 10, \&j_null ], [ 30, \&json_valid ]) if $want eq 'valid';
	return json_bad();
}

# ---- the others ------------------------------------------------------------

my @KEYS = ((map { "k$_" } 1 .. 25), 'ключ', '🔑', ' ', "k\n", "'", '%s');
# keys of the longest length, random and thus incompressible, to repeat
my @LONG_KEYS = ((map { rand_word_chars($KEY_BYTES) } 1 .. 3), (map { random_text($KEY_BYTES) } 1 .. 3));

sub gen_idempotency_key
{
	my ($want) = @_;
	if ($want eq 'invalid')
	{
		return wpick(
			[ 10, sub { optional_text('invalid', 'idempotency_key') } ],
			[ 1, sub { t_rep('k', 100 * 1024) } ],
			[ 2, sub { t_val(rand_word_chars($KEY_BYTES + 1 + int(rand(8000)))) } ]);
	}
	return wpick(
		[ 45, sub { undef } ],
		[ 5, \&t_null ],
		[ 35, sub { t_val(pick(@KEYS)) } ],
		# incompressible random keys of (about) the limit: their rows fit in
		# the index of (tenant_id, idempotency_key)
		[ 2, sub { t_val(pick(\&rand_word_chars, \&random_text)->($KEY_BYTES)) } ],
		[ 2, sub { t_val(rand_word_chars($KEY_BYTES - 1)) } ],
		[ 1, sub { t_val(pick(@LONG_KEYS)) } ],
		[ 3, sub { near_limit($KEY_BYTES, 'under') } ],
		[ 14, \&any_text ]);
}

sub hex32 { return join '', map { pick('0' .. '9', 'a' .. 'f') } 1 .. 32 }

sub gen_trace_id
{
	my ($want) = @_;
	if ($want eq 'valid')
	{
		return wpick([ 60, sub { undef } ], [ 10, \&t_null ],
			[ 28, sub { t_val(hex32() =~ s/^0{32}$/"0" x 31 . "1"/er) } ],
			[ 2, sub { t_val(('0' x 31) . '1') } ]);
	}
	my $h = hex32();
	return wpick(
		[ 5, sub { t_val('') } ],
		[ 5, sub { t_val(uc($h) =~ tr/a-f/A-F/r) } ],
		[ 5, sub { t_val(substr($h, 1)) } ],
		[ 5, sub { t_val($h . 'a') } ],
		[ 5, sub { t_val('0' x 32) } ],
		[ 5, sub { t_val("00-$h-b7ad6b7169203331-01") } ],
		[ 3, sub { t_val(substr($h, 1) . 'g') } ],
		[ 3, sub { t_val('é' x 16) } ],          # 32 bytes, not hex
		[ 3, sub { t_val(" $h") } ],
		[ 3, sub { t_val("$h\n") } ],
		[ 2, sub { t_rep('a', $MB) } ],
		# the length is checked before the form
		[ 3, sub { t_val('a' x ($NAME_BYTES + pick(-1, 0, 1, 2))) } ],
		[ 2, sub { t_val(($h x 8) . pick('', 'a', 'é', 'ab')) } ],
		[ 2, sub { near_limit($NAME_BYTES, pick('under', 'over')) } ],
		[ 10, \&any_text ],
		[ 3, \&generic_bad ]);
}

sub gen_pii
{
	my ($want) = @_;
	if ($want eq 'valid')
	{
		my @v = ([ 'true', 1 ], [ 'false', 0 ], [ "'yes'", 1 ], [ "'on'", 1 ], [ "'1'", 1 ],
			[ "'off'", 0 ], [ "'f'", 0 ], [ "'tru'", 1 ], [ "' true '", 1 ], [ "'N'", 0 ]);
		return wpick([ 60, sub { undef } ], [ 40, sub { my $p = pick(@v); +{ sql => $p->[0] } } ]);
	}
	return wpick(
		[ 10, sub { +{ sql => 'NULL', null => 1 } } ],
		[ 3, sub { bad("'maybe'", '22P02') } ],
		[ 2, sub { bad("''", '22P02') } ],
		[ 2, sub { bad('2', '42883') } ],
		[ 2, sub { bad("'t'::text", '42883') } ],
		[ 1, \&generic_bad ]);
}

sub gen_pii_fields
{
	my ($want) = @_;
	my $elem = sub { (any_text())->{sql} };
	if ($want eq 'valid')
	{
		return wpick(
			[ 50, sub { undef } ],
			[ 5, sub { +{ sql => 'NULL', null => 1 } } ],
			[ 5, sub { +{ sql => "'{}'", ndim => 0 } } ],
			[ 25, sub { +{ sql => 'ARRAY[' . join(', ', map { $elem->() } 0 .. int(rand(5))) . ']', ndim => 1 } } ],
			[ 3, sub { +{ sql => q('{"NULL", "", " "}'), ndim => 1 } } ],
			[ 2, sub { +{ sql => "'[0:1]={a,b}'", ndim => 1 } } ],
			[ 0.3, sub { +{ sql => "array_fill('email'::text, ARRAY[100000])", ndim => 1 } } ],
			[ 0.3, sub { +{ sql => "ARRAY(SELECT 'f' || g FROM generate_series(1, 50000) g)", ndim => 1 } } ],
			[ 1, sub { +{ sql => "ARRAY[repeat('p', $MB)]", ndim => 1 } } ]);
	}
	return wpick(
		[ 5, sub { +{ sql => "ARRAY['a', NULL]", ndim => 1, has_null => 1 } } ],
		[ 3, sub { +{ sql => 'ARRAY[NULL]::text[]', ndim => 1, has_null => 1 } } ],
		[ 3, sub { +{ sql => "'{NULL}'", ndim => 1, has_null => 1 } } ],
		[ 2, sub { +{ sql => 'array_fill(NULL::text, ARRAY[3])', ndim => 1, has_null => 1 } } ],
		[ 0.3, sub { +{ sql => "array_fill('x'::text, ARRAY[100000]) || NULL::text", ndim => 1, has_null => 1 } } ],
		[ 4, sub { +{ sql => "ARRAY[['a'], ['b']]", ndim => 2 } } ],
		[ 2, sub { +{ sql => "'{{a,NULL},{b,c}}'", ndim => 2, has_null => 1 } } ],
		[ 2, sub { +{ sql => "array_fill('x'::text, ARRAY[2,2,2,2,2,2])", ndim => 6 } } ],
		[ 1, sub { bad("array_fill('x'::text, ARRAY[2,2,2,2,2,2,2])", '54000') } ],
		[ 2, sub { bad("'{{a},{b,c}}'", '22P02') } ],
		[ 2, sub { bad("'not an array'", '22P02') } ],
		[ 2, sub { bad('ARRAY[1, 2]', '42883') } ],
		[ 1, \&generic_bad ]);
}

sub gen_scheduled_for
{
	my ($want) = @_;
	if ($want eq 'valid')
	{
		return wpick(
			[ 60, sub { undef } ],
			[ 10, sub { +{ sql => 'NULL', null => 1 } } ],
			[ 30, sub { +{ sql => sql_text(pick(
				'epoch', '2000-01-01', '1970-01-01 00:00:00+14', '2026-11-28T10:00:00.123456789Z',
				'294276-12-31 23:59:59.999999+00', '4714-11-24 00:00:00+00 BC', '1999-12-31 23:59:60+00',
				'J2451545', '3000-01-01 00:00:00 America/New_York', '1066-10-14 09:00:00-00:01:15')) } } ]);
	}
	return wpick(
		[ 5, sub { +{ sql => pick("'infinity'", "'-infinity'", "'infinity'::timestamp"), infinite => 1 } } ],
		[ 2, sub { bad(pick("'294277-01-01'", "'4714-11-23 00:00:00+00 BC'", "'2026-02-30'"), '22008') } ],
		[ 2, sub { bad(pick("'garbage'", "''", "'allballs'", "'   '"), '22007') } ],
		[ 1, sub { bad('42', '42883') } ],
		[ 1, \&generic_bad ]);
}

my %GEN = (
	tenant_id => \&gen_tenant,
	aggregate_type => \&required_text,
	aggregate_id => \&required_text,
	event_type => \&gen_event_type,
	payload => \&gen_payload,
	metadata => \&gen_metadata,
	idempotency_key => \&gen_idempotency_key,
	correlation_id => \&optional_text,
	trace_id => \&gen_trace_id,
	pii => \&gen_pii,
	pii_fields => \&gen_pii_fields,
	consent => \&gen_consent,
	producer => \&optional_text);

# A call: a spec per argument (undef: not passed), the SQL statement.
sub gen_call
{
	my $mode = wpick([ 35, sub { 'valid' } ], [ 35, sub { 'single' } ], [ 30, sub { 'chaos' } ]);
	my $bad_one = pick(@ARGS);
	my %c = (mode => $mode);
	for my $a (@ARGS)
	{
		my $want =
		    $mode eq 'valid' ? 'valid'
		  : $mode eq 'single' ? ($a eq $bad_one ? 'invalid' : 'valid')
		  : (chance(0.25) ? 'invalid' : 'valid');
		if ($a eq 'event_version')
		{
			my $et = $c{event_type};
			$c{$a} = gen_event_version($want, $et && !$et->{sure} ? event_type_version($et->{val}) : undef);
		}
		elsif ($a eq 'scheduled_for')
		{
			$c{$a} = gen_scheduled_for($want);
		}
		else
		{
			$c{$a} = $GEN{$a}->($want, $a);
		}
	}
	my @parts = map { "$_ => $c{$_}{sql}" } grep { $c{$_} && !$c{$_}{omit} } @ARGS;
	# named arguments in any order
	for (my $i = @parts - 1; $i > 0; $i--)
	{
		my $j = int(rand($i + 1));
		@parts[ $i, $j ] = @parts[ $j, $i ];
	}
	$c{extra} = [];
	if ($mode eq 'chaos' && chance(0.01))
	{
		# an argument named twice, or a name that does not exist
		my @given = grep { $c{$_} && !$c{$_}{omit} } @ARGS;
		my @extra = ([ "tenant => 'x'", '42883' ], [ "pii_field => '{}'", '42883' ]);
		push @extra, [ pick(@given) . ' => NULL', '42601' ] if @given;
		my ($sql, $code) = @{ pick(@extra) };
		push @parts, $sql;
		push @{ $c{extra} }, $code;
	}
	$c{sql} = 'SELECT outbox_save(' . join(', ', @parts) . ');';
	return \%c;
}

# ---------------------------------------------------------------------------
# The model: the outcomes README allows for a call.  Returns the set of
# acceptable SQLSTATEs ('ok': an id is returned) and, when voutbox itself
# must refuse the call, the SQLSTATE and the argument its message names.
# ---------------------------------------------------------------------------

sub topic_ok
{
	my ($t) = @_;
	return bytes($t) > 0 && bytes($t) <= 249 && $t ne '.' && $t ne '..' && $t =~ /\A[A-Za-z0-9._-]+\z/;
}

sub validate
{
	my ($c) = @_;
	my $text = sub { my $s = $c->{ $_[0] }; return $s ? $s->{val} : undef };
	my $given = sub { my $s = $c->{ $_[0] }; return $s && !$s->{null} && (!exists $s->{val} || defined $s->{val}) };

	# Each text argument in turn: NULL, empty, too long (in bytes; names are
	# limited to 255, keys to 1024).
	for my $a (qw(tenant_id aggregate_type aggregate_id event_type))
	{
		my $v = $text->($a);
		return ('22004', $a) unless defined $v;
		return ('22023', $a) if $v eq '';
		return ('22001', $a) if bytes($v) > $MAX_BYTES{$a};
	}
	my $n = event_type_version($text->('event_type'));
	return ('22023', 'event_type') unless defined $n;
	my $ev = $c->{event_version};
	return ('22023', 'event_version') if $ev && defined $ev->{val} && $ev->{val} != $n;
	my $p = $c->{payload};
	return ('22004', 'payload') if $p->{null};
	return ('54000', 'payload') if $p->{len} > $MAX_PAYLOAD;
	my $m = $c->{metadata};
	return ('22023', 'metadata') if $m && !$m->{null} && !$m->{object};
	for my $a (qw(idempotency_key correlation_id))
	{
		return ('22023', $a) if $given->($a) && $text->($a) eq '';
		return ('22001', $a) if $given->($a) && bytes($text->($a)) > $MAX_BYTES{$a};
	}
	if ($given->('trace_id'))
	{
		my $t = $text->('trace_id');
		return ('22023', 'trace_id') if $t eq '';
		return ('22001', 'trace_id') if bytes($t) > $MAX_BYTES{trace_id};
		return ('22P02', 'trace_id') unless $t =~ /\A[0-9a-f]{32}\z/ && $t !~ /\A0+\z/;
	}
	return ('22004', 'pii') if $c->{pii} && $c->{pii}{null};
	my $pf = $c->{pii_fields};
	if ($pf && !$pf->{null})
	{
		return ('2202E', 'pii_fields') if $pf->{ndim} > 1;
		return ('22004', 'pii_fields') if $pf->{has_null};
	}
	my $data = 0;
	$data += $_->{plen} // 0 for grep { $_ && !$_->{null} } map { $c->{$_} } qw(payload metadata consent pii_fields);
	return ('54000', 'payload') if $data > $MAX_PAYLOAD;
	return ('22023', 'producer') if $given->('producer') && $text->('producer') eq '';
	return ('22001', 'producer') if $given->('producer') && bytes($text->('producer')) > $MAX_BYTES{producer};
	return ('22008', 'scheduled_for') if $c->{scheduled_for} && $c->{scheduled_for}{infinite};
	my $tenant = $text->('tenant_id');
	return ('42602', 'tenant_id') if bytes($tenant) <= 249 && (!topic_ok($tenant) || $tenant =~ /\./);
	return ('42602', 'voutbox.topic_template') unless topic_ok($tenant . '.' . $text->('event_type'));
	# the message key from voutbox.key_template, {aggregate_id} (the default)
	return ('22001', 'voutbox.key_template') if bytes($text->('aggregate_id')) > $KEY_BYTES;
	return (undef, undef);
}

sub expected
{
	my ($c) = @_;
	my %ok;
	my $sure = 0;
	for my $s (grep { defined } map { $c->{$_} } @ARGS)
	{
		$ok{$_} = 1 for @{ $s->{in} // [] };
		$sure ||= $s->{sure};
	}
	if (@{ $c->{extra} })
	{
		$ok{$_} = 1 for @{ $c->{extra} };
		$sure = 1;
	}
	my ($code, $arg) = $sure ? () : validate($c);
	$ok{ $code // 'ok' } = 1 unless $sure;
	return (\%ok, $code, $arg);
}

# The message and detail of the 22001 error of a text over its limit.
sub too_long
{
	my ($c, $arg) = @_;
	if ($arg eq 'voutbox.key_template')
	{
		my $len = bytes($c->{aggregate_id}{val});
		return ("the message key rendered from voutbox.key_template is longer than $KEY_BYTES bytes",
			qq{It is $len bytes long; voutbox.key_template is "{aggregate_id}".});
	}
	return ("$arg is longer than $MAX_BYTES{$arg} bytes", 'It is ' . bytes($c->{$arg}{val}) . ' bytes long.');
}

# ---------------------------------------------------------------------------
# The calls, streamed through one psql session
# ---------------------------------------------------------------------------

my $t0 = time;
my @calls = map { gen_call() } 1 .. $CALLS;
note(sprintf('generated %d calls in %.1f s', $CALLS, time - $t0));

my $node = voutbox_node('fuzz', undef);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $script = "$tmp/fuzz_calls.sql";
my $mark = "\@\@fuzz$seed";

# After each call: its SQLSTATE and, on error, the message, between markers.
open my $fh, '>:raw', $script or die "could not write $script: $!";
my $line = 0;
my $emit = sub { print $fh encode_utf8($_), "\n" for @_; $line += @_ };
$emit->('\\encoding UTF8', '\\set ON_ERROR_STOP 0', '\\set VERBOSITY verbose',
	"SET statement_timeout = '$TIMEOUT';",
	'SELECT pg_backend_pid() AS pid \\gset', "\\echo $mark PID :pid", '\\timing on');
for my $n (0 .. $#calls)
{
	$emit->($calls[$n]{sql});
	$calls[$n]{line} = $line;
	$emit->("\\echo $mark R $n :SQLSTATE", '\\if :ERROR', '\\echo :LAST_ERROR_MESSAGE', '\\endif',
		"\\echo $mark E $n");
}
$emit->('\\timing off', 'SELECT pg_backend_pid() AS pid \\gset', "\\echo $mark PID :pid");
close $fh;
note(sprintf('the calls are in %s (%.1f MB)', $script, (-s $script) / $MB));

sub backends
{
	return $node->safe_psql('postgres',
		"SELECT string_agg(backend_type || ' ' || pid, ', ' ORDER BY backend_type) FROM pg_stat_activity "
		  . "WHERE backend_type IN ('checkpointer', 'voutbox launcher', 'voutbox worker')");
}

sub postmaster_pid
{
	my ($pid) = split /\n/, slurp_file($node->data_dir . '/postmaster.pid');
	return $pid;
}

# The worker is up (it cannot reach a broker, and waits for one).
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'voutbox worker'")
  or die 'the voutbox worker did not start';
my $postmaster_before = postmaster_pid();
my $backends_before = backends();

# A value for a diagnostic: control characters escaped, long ones cut.
sub show
{
	my ($s) = @_;
	$s = substr($s, 0, 300) . '... (' . length($s) . ' characters)' if length($s) > 300;
	return $s =~ s/([\x00-\x1f\x7f])/sprintf('\\x%02x', ord $1)/ger;
}

sub run_psql
{
	my ($file, @opts) = @_;
	my ($out, $err) = ("$file.stdout", "$file.stderr");
	my $h = IPC::Run::run(
		[ 'psql', '-X', '-q', '-A', '-t', @opts, '-h', $node->host, '-p', $node->port,
		  '-d', 'postgres', '-f', $file ],
		'<', \undef, '>', $out, '2>', $err,
		IPC::Run::timeout(15 * 60));
	my $rc = $? >> 8;
	local $/;
	open my $o, '<:raw', $out or die;
	open my $e, '<:raw', $err or die;
	return ($rc, decode_utf8(<$o> // ''), decode_utf8(<$e> // ''));
}

# The event's data (payload, metadata, consent, pii_fields) is bounded as a
# whole, as JSON text the way PostgreSQL prints it: PostgreSQL measures each
# value for the model, which cannot print jsonb the same way.
my $sizes = "$script.sizes";
my @measured;
open my $sfh, '>:raw', $sizes or die "could not write $sizes: $!";
print $sfh "\\encoding UTF8\n\\set ON_ERROR_STOP 0\nSET statement_timeout = '$TIMEOUT';\n";
for my $c (@calls)
{
	for my $a (qw(payload metadata consent pii_fields))
	{
		my $v = $c->{$a};
		next if !$v || $v->{null} || $v->{omit} || $v->{sure};
		my $text = $a eq 'pii_fields' ? "pg_catalog.array_to_json(($v->{sql})::text[])::text"
		  : "(($v->{sql})::jsonb)::text";
		push @measured, $v;
		print $sfh encode_utf8("SELECT $#measured, octet_length($text);\n");
	}
}
close $sfh;
my (undef, $sized) = run_psql($sizes);
for (split /\n/, $sized)
{
	my ($i, $len) = /\A(\d+)\|(\d+)\z/ or next;
	$measured[$i]{plen} = $len;
}
note(sprintf('%d of %d values measured', scalar(grep { defined $_->{plen} } @measured), scalar(@measured)));

$t0 = time;
my ($rc, $out, $err) = run_psql($script);
my $elapsed = time - $t0;
note(sprintf('%d calls in %.1f s', $CALLS, $elapsed));

is($rc, 0, 'psql ran every call to the end');
my @lost = grep { /server closed the connection|terminating connection|connection to server was lost|no connection to the server/ }
  split /\n/, $err;
is(scalar(@lost), 0, 'no connection was lost') or diag(join "\n", map { show($_) } @lost[ 0 .. ($#lost < 4 ? $#lost : 4) ]);
my @pids = $out =~ /^\Q$mark\E PID (\d+)$/mg;
ok(@pids == 2 && $pids[0] == $pids[1], 'one session, one backend, from the first call to the last')
  or diag("backend pids: @pids");

# ---- outcomes --------------------------------------------------------------

my (%state, %id, %msg, %ms);
my $unparsed = 0;
while ($out =~ /\G(.*?)^\Q$mark\E R (\d+) (\S*)\n(.*?)^\Q$mark\E E \2\n/gcms)
{
	my ($pre, $n, $st, $m) = ($1, $2, $3, $4);
	$pre =~ s/\A\Q$mark\E PID \d+\n//;    # before the first call
	if ($pre =~ /\A(?:([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\n)?Time: ([\d.]+) ms[^\n]*\n\z/)
	{
		$id{$n} = $1 if defined $1;
		$ms{$n} = $2;
	}
	else
	{
		$unparsed++;
		diag("call $n: unexpected output: " . substr($pre, 0, 300)) if $unparsed <= 5;
	}
	$state{$n} = $st;
	chomp $m;
	$msg{$n} = $m if $st ne '00000';
}
is(scalar(keys %state), $CALLS, "every call reported its outcome");
is($unparsed, 0, 'every call printed an id or nothing');

# stderr: per statement line, the error's severity, SQLSTATE and location
my %err_at;
my @blocks = split /^psql:\Q$script\E:(\d+): /m, $err;
my $stray = shift @blocks;
ok($stray eq '', 'psql printed nothing but statement errors') or diag(show($stray));
my $nonerror = 0;
while (my ($l, $b) = splice(@blocks, 0, 2))
{
	my ($sev, $code) = $b =~ /\A(\w+):  (?:([0-9A-Z]{5}): )?/;
	my @loc = $b =~ /^LOCATION:  [^\n]*, ([\w.]+):\d+$/mg;
	my ($detail) = $b =~ /^DETAIL:  ([^\n]*)$/m;
	$err_at{$l} = { sev => $sev // '?', code => $code // '?', file => $loc[-1] // '?', detail => $detail };
	if (($sev // '') ne 'ERROR')
	{
		$nonerror++;
		diag("line $l: " . substr($b, 0, 500)) if $nonerror <= 5;
	}
}
is($nonerror, 0, 'no WARNING, FATAL or PANIC, only ERRORs');

# histogram
my %hist;
$hist{ $state{$_} eq '00000' ? 'ok (id)' : $state{$_} }++ for keys %state;
note(join "\n", 'outcome    calls', map { sprintf('%-10s %5d', $_, $hist{$_}) } sort keys %hist);
my %by_mode;
$by_mode{ $calls[$_]{mode} }{ $state{$_} eq '00000' ? 'ok' : 'error' }++ for keys %state;
note(join ', ', map { "$_: " . ($by_mode{$_}{ok} // 0) . ' ok, ' . ($by_mode{$_}{error} // 0) . ' errors' }
	sort keys %by_mode);

my @slow = (sort { $ms{$b} <=> $ms{$a} } keys %ms)[ 0 .. 4 ];
note('slowest calls: ' . join(', ', map { sprintf('#%d %.0f ms', $_, $ms{$_}) } @slow));

my $internal = grep { $state{$_} =~ /^XX/ } keys %state;
is($internal, 0, 'no internal error (XX000, XX001, XX002)');
my $timeouts = grep { $state{$_} eq '57014' } keys %state;
is($timeouts, 0, "no call took longer than $TIMEOUT");

my %voutbox_file = map { $_ => 1 } qw(save.c validate.c routing.c voutbox.c storage.c worker.c producer.c
  envelope.c retention.c);
$voutbox_file{ $_ =~ s{.*/}{}r } = 1 for glob(dirname(__FILE__) . '/../../src/*.c');

my ($unexpected, $unclear, $stderr_mismatch, $too_long_bad) = (0, 0, 0, 0);
my (%too_long, %at_limit_ok, $straddled);
$straddled = 0;
for my $n (sort { $a <=> $b } keys %state)
{
	my $c = $calls[$n];
	my ($ok, $code, $arg) = expected($c);
	my $st = $state{$n};
	my $got = $st eq '00000' ? 'ok' : $st;
	my $m = $msg{$n} // '';
	my $e = $err_at{ $c->{line} } // {};
	my $by_voutbox = $voutbox_file{ $e->{file} // '' };
	if ($got eq 'ok')
	{
		for my $a (keys %MAX_BYTES)
		{
			$at_limit_ok{$a}++
			  if $c->{$a} && defined $c->{$a}{val} && !$c->{$a}{sure} && bytes($c->{$a}{val}) == $MAX_BYTES{$a};
		}
	}
	if ($st eq '22001')
	{
		# a text over its limit: validate.c names it, its limit and its length
		my ($want_m, $want_d) = defined $code && $code eq '22001' ? too_long($c, $arg) : ('?', '?');
		if (($e->{file} // '') eq 'validate.c' && $m eq $want_m && ($e->{detail} // '') eq $want_d)
		{
			$too_long{$arg}++;
			$straddled++ if $arg ne 'voutbox.key_template' && length($c->{$arg}{val}) <= $MAX_BYTES{$arg};
		}
		else
		{
			$too_long_bad++;
			diag("call #$n: expected 22001 \"$want_m\" ($want_d), got \"" . show($m) . '" ('
				  . show($e->{detail} // 'no detail') . ') from ' . ($e->{file} // '?')
				  . "\n    " . show($c->{sql}))
			  if $too_long_bad <= 10;
		}
	}
	if (!$ok->{$got})
	{
		$unexpected++;
		diag("call #$n ($c->{mode}, line $c->{line}): expected " . join('|', sort keys %$ok) . ", got $got"
			  . ($got eq 'ok' ? '' : " (raised in " . ($e->{file} // '?') . '): ' . show($m))
			  . "\n    " . show($c->{sql}))
		  if $unexpected <= 20;
	}
	next if $got eq 'ok';
	if (($e->{code} // '') ne $st)
	{
		$stderr_mismatch++;
		diag("call #$n: psql reported $st, stderr " . ($e->{code} // 'nothing')) if $stderr_mismatch <= 5;
	}
	my $clear = $m =~ /\S/;
	if ($clear && $by_voutbox)
	{
		# voutbox refused the call: the message names the argument
		my @names = map { quotemeta } @ARGS;
		$clear = $m =~ /^(?:@{[ join '|', @names ]})\b/
		  || $m =~ /^the topic ".*" rendered from voutbox\.topic_template /s
		  || $m =~ /^the message key rendered from voutbox\.key_template /;
		$clear &&= $arg =~ /^voutbox\./ ? $m =~ /\Q$arg\E/ : $m =~ /^\Q$arg\E\b/
		  if defined $code && $code eq $st;
	}
	if (!$clear)
	{
		$unclear++;
		diag("call #$n: unclear message ($st, from " . ($e->{file} // '?') . '): ' . show($m)
			  . "\n    " . show($c->{sql}))
		  if $unclear <= 20;
	}
}
is($unexpected, 0, 'every call had an outcome that README allows (success, or the SQLSTATE of its bad argument)');
is($stderr_mismatch, 0, 'psql printed every error with its SQLSTATE');
is($unclear, 0, "every error has a message, and voutbox's own errors name the argument");
is($too_long_bad, 0, 'every 22001 came from validate.c and named the argument, its limit and its length');
note('22001 by argument: ' . join(', ', map { "$_ $too_long{$_}" } sort keys %too_long)
	  . "; $straddled within the limit in characters, over it in bytes");
note('saved at the limit exactly: ' . join(', ', map { "$_ $at_limit_ok{$_}" } sort keys %at_limit_ok));
is(join(' ', grep { !$too_long{$_} } sort keys %MAX_BYTES), '', 'every text argument was refused over its limit');
cmp_ok($straddled, '>', 0, 'texts within the limit in characters were refused over it in bytes');
is(join(' ', grep { !$at_limit_ok{$_} } qw(aggregate_type aggregate_id idempotency_key correlation_id producer)),
	'', 'texts of exactly the limit were saved (those that can be: not tenant_id, event_type, trace_id)');

my $oks = scalar(keys %id);
my $share = $oks / $CALLS;
note(sprintf('%d calls (%.1f%%) saved an event, %d (%.1f%%) raised an ERROR',
	$oks, 100 * $share, $CALLS - $oks, 100 * (1 - $share)));
cmp_ok($share, '>=', 0.20, 'at least 20% of the calls succeeded');
cmp_ok($share, '<=', 0.80, 'at least 20% of the calls failed');

# ---- idempotency: a repeated (tenant_id, key) returns the first id ----------

my (%first_of_key, %inserted_by, $idem_bad);
$idem_bad = 0;
for my $n (sort { $a <=> $b } keys %id)
{
	my $c = $calls[$n];
	my $k = $c->{idempotency_key};
	my $pair = $k && defined $k->{val} ? $c->{tenant_id}{val} . "\0" . $k->{val} : undef;
	my $want = defined $pair ? $first_of_key{$pair} : undef;
	if (defined $want ? $id{$n} ne $want : exists $inserted_by{ $id{$n} })
	{
		$idem_bad++;
		diag("call #$n returned $id{$n}, expected " . ($want // 'a new id')) if $idem_bad <= 5;
	}
	next if defined $want;
	$first_of_key{$pair} = $id{$n} if defined $pair;
	$inserted_by{ $id{$n} } //= $n;
}
is($idem_bad, 0, 'a repeated idempotency key returned the first id, every other call a new one');
note(($oks - scalar(keys %inserted_by)) . ' calls returned the id of an earlier event (repeated key)');

# ---- the events are stored with their arguments ------------------------------

is($node->safe_psql('postgres', 'SELECT count(*) FROM outbox'),
	scalar(keys %inserted_by), 'the outbox holds exactly the events whose ids were returned');

sub check
{
	my ($name, $cond) = @_;
	return "CASE WHEN ($cond) IS NOT TRUE THEN '$name' END";
}

my $verify = "$tmp/fuzz_verify.sql";
open $fh, '>:raw', $verify or die;
print $fh "\\encoding UTF8\n\\set ON_ERROR_STOP 1\n";
for my $uuid (sort keys %inserted_by)
{
	my $n = $inserted_by{$uuid};
	my $c = $calls[$n];
	my $sql = sub { "($c->{$_[0]}{sql})" };
	my $has = sub { $c->{ $_[0] } && !$c->{ $_[0] }{null} && (!exists $c->{ $_[0] }{val} || defined $c->{ $_[0] }{val}) };
	my @checks = map { check($_, "$_ = " . $sql->($_) . '::text') } qw(tenant_id aggregate_type aggregate_id event_type);
	push @checks,
	  check('event_version', 'event_version = ' . event_type_version($c->{event_type}{val})),
	  check('payload', 'payload = ' . $sql->('payload') . '::jsonb'),
	  check('metadata', $has->('metadata') ? 'metadata = ' . $sql->('metadata') . '::jsonb' : 'metadata IS NULL'),
	  check('idempotency_key', 'idempotency_key = '
		  . ($has->('idempotency_key') ? $sql->('idempotency_key') . '::text' : 'id::text')),
	  check('correlation_id', 'correlation_id = '
		  . ($has->('correlation_id') ? $sql->('correlation_id') . '::text' : 'aggregate_id')),
	  check('trace_id', $has->('trace_id') ? 'trace_id = ' . $sql->('trace_id') . '::text' : 'trace_id IS NULL'),
	  check('pii', $c->{pii} ? 'pii = ' . $sql->('pii') . '::boolean' : 'NOT pii'),
	  check('pii_fields', $has->('pii_fields') ? 'pii_fields = ' . $sql->('pii_fields') . '::text[]' : 'pii_fields IS NULL'),
	  check('consent', $has->('consent') ? 'consent = ' . $sql->('consent') . '::jsonb' : 'consent IS NULL'),
	  check('producer', $has->('producer') ? 'producer = ' . $sql->('producer') . '::text' : 'producer IS NULL'),
	  check('scheduled_for', $has->('scheduled_for')
		  ? 'scheduled_for = ' . $sql->('scheduled_for') . '::timestamptz' : 'scheduled_for IS NULL'),
	  check('topic', "topic = tenant_id || '.' || event_type"),
	  check('key', 'key = aggregate_id');
	print $fh encode_utf8("SELECT concat_ws(' ', 'V', $n, " . join(', ', @checks) . ") FROM outbox WHERE id = '$uuid';\n");
}
close $fh;
my ($vrc, $vout, $verr) = run_psql($verify);
is($vrc, 0, 'the stored events could be compared with their arguments') or diag(show($verr));
my %seen;
my $wrong = 0;
for (split /\n/, $vout)
{
	my ($n, @bad) = /^V (\d+)(?: (.*))?$/ ? ($1, split / /, $2 // '') : (-1, "unparsable: $_");
	$seen{$n} = 1;
	next unless @bad;
	$wrong++;
	diag("call #$n stored wrong @bad: " . show($calls[$n]{sql})) if $wrong <= 10;
}
is(scalar(keys %seen), scalar(keys %inserted_by), 'every saved event is in the outbox view');
is($wrong, 0, 'every saved event carries the arguments it was given');

# ---- the server survived ----------------------------------------------------

is(postmaster_pid(), $postmaster_before, 'the postmaster is the same process');
is(backends(), $backends_before, 'checkpointer, launcher and worker were not restarted');
my $log = slurp_file($node->logfile);
my @crash = $log =~ /^.*(?:was terminated by signal|server process \(PID \d+\) exited|terminating any other active server processes|PANIC:|TRAP:|background worker "voutbox [^"]*" \(PID \d+\) exited with exit code [1-9]).*$/mg;
is(scalar(@crash), 0, 'the server log shows no crash and no failed voutbox process')
  or diag(join "\n", @crash[ 0 .. ($#crash < 9 ? $#crash : 9) ]);

# (immediate: on a fast stop the worker would give the broker that never
# answered 5 s to acknowledge its events)
$node->stop('immediate');
done_testing();
