# META.json against the PGXN Meta Spec 1.0.0 (RFC-1 of pgxn/rfcs), its rules
# written out here as this test reads them (Debian 12 packages no validator;
# PGXN's own is the CPAN module PGXN::Meta::Validator): the mandatory keys and their forms (Term, SemVer, license,
# maintainer, provides with a file that exists, meta-spec), the optional ones
# (prereqs by phase and relation, resources, tags, release_status,
# no_index), no key outside the spec but "x_" ones; and that it agrees with
# voutbox.control (version, and the file it installs).  Each rule is also
# tried on a broken copy, so that the check is seen to fail.
use strict;
use warnings;

use Test::More;
use JSON::PP;
use File::Basename qw(dirname);
use Cwd qw(abs_path);

plan skip_all => 'not in the sanitizer pass' if $ENV{VOUTBOX_SANITIZE_PRELOAD};
my $root = abs_path(dirname(__FILE__) . '/../..');

sub slurp
{
	my ($path) = @_;
	open my $fh, '<:raw', $path or die "$path: $!";
	local $/;
	return <$fh>;
}

# A Term: at least two characters, no slash, backslash, control character
# or whitespace.
sub is_term { my ($s) = @_; return defined $s && !ref $s && $s =~ m{\A[^/\\\s\p{Cc}]{2,}\z} }
# A tag: like a term, of one to 255 characters.
sub is_tag { my ($s) = @_; return defined $s && !ref $s && $s =~ m{\A[^/\\\p{Cc}]{1,255}\z} }
# SemVer 2.0.0 (the spec's versions).
sub is_semver
{
	my ($s) = @_;
	return defined $s && !ref $s
	  && $s =~ /\A(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)
	            (?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\z/x;
}
# A version range of prereqs: "0", a version, or comparisons joined by commas.
sub is_range
{
	my ($s) = @_;
	return 0 if !defined $s || ref $s;
	return 1 if $s eq '0';
	for my $part (split /\s*,\s*/, $s)
	{
		$part =~ s/\A(?:==|!=|>=|<=|>|<)\s*//;
		return 0 unless is_semver($part);
	}
	return 1;
}
my %licenses = map { $_ => 1 } qw(agpl_3 apache_1_1 apache_2_0 artistic_1 artistic_2 bsd freebsd gfdl_1_2
  gfdl_1_3 gpl_1 gpl_2 gpl_3 lgpl_2_1 lgpl_3_0 mit mozilla_1_0 mozilla_1_1 openssl perl_5 postgresql qpl_1_0
  ssleay sun zlib open_source restricted unrestricted unknown);

# The problems of a META.json (decoded), as messages; none when it is valid.
sub problems
{
	my ($m) = @_;
	my @p;
	my %known = map { $_ => 1 } qw(name abstract version maintainer license provides meta-spec description
	  prereqs resources tags release_status no_index generated_by);
	ref $m eq 'HASH' or return ('not an object');
	for my $k (sort keys %$m)
	{
		push @p, "unknown key $k" unless $known{$k} || $k =~ /\A[xX]_/;
	}
	for my $k (qw(name abstract version maintainer license provides meta-spec))
	{
		push @p, "missing $k" unless exists $m->{$k};
	}
	push @p, 'name is not a term' if exists $m->{name} && !is_term($m->{name});
	push @p, 'version is not SemVer' if exists $m->{version} && !is_semver($m->{version});
	for my $k (qw(abstract description generated_by))
	{
		push @p, "$k is not a non-empty string"
		  if exists $m->{$k} && (ref $m->{$k} || !length $m->{$k});
	}
	if (exists $m->{maintainer})
	{
		my $mt = $m->{maintainer};
		my @list = ref $mt eq 'ARRAY' ? @$mt : ($mt);
		push @p, 'maintainer is not a string or a list of them'
		  if !@list || grep { !defined $_ || ref $_ || !length $_ } @list;
	}
	if (exists $m->{license})
	{
		my $l = $m->{license};
		if (ref $l eq 'HASH')
		{
			push @p, 'license map is empty' unless %$l;
			push @p, "license $_ has no URL" for grep { !defined $l->{$_} || $l->{$_} !~ m{\Ahttps?://} } sort keys %$l;
		}
		else
		{
			my @list = ref $l eq 'ARRAY' ? @$l : ($l);
			push @p, "license $_ is not one of the spec's" for grep { !defined $_ || ref $_ || !$licenses{$_} } @list;
		}
	}
	if (exists $m->{provides})
	{
		my $pr = $m->{provides};
		if (ref $pr ne 'HASH' || !%$pr)
		{
			push @p, 'provides is not a non-empty map';
		}
		else
		{
			for my $ext (sort keys %$pr)
			{
				my $e = $pr->{$ext};
				push @p, "provides: $ext is not a term" unless is_term($ext);
				if (ref $e ne 'HASH') { push @p, "provides: $ext is not a map"; next; }
				push @p, "provides: $ext has no file" unless defined $e->{file};
				push @p, "provides: $ext: file $e->{file} does not exist"
				  if defined $e->{file} && !-f "$root/$e->{file}";
				push @p, "provides: $ext: version is not SemVer" unless is_semver($e->{version});
				push @p, "provides: $ext: docfile $e->{docfile} does not exist"
				  if defined $e->{docfile} && !-f "$root/$e->{docfile}";
				for my $k (sort keys %$e)
				{
					push @p, "provides: $ext: unknown key $k"
					  unless $k =~ /\A(?:file|version|abstract|docfile)\z/ || $k =~ /\A[xX]_/;
				}
			}
		}
	}
	if (exists $m->{'meta-spec'})
	{
		my $s = $m->{'meta-spec'};
		push @p, 'meta-spec version is not 1.0.x'
		  unless ref $s eq 'HASH' && defined $s->{version} && $s->{version} =~ /\A1\.0\.\d+\z/;
	}
	if (exists $m->{prereqs})
	{
		my $pq = $m->{prereqs};
		if (ref $pq ne 'HASH') { push @p, 'prereqs is not a map'; }
		else
		{
			for my $phase (sort keys %$pq)
			{
				push @p, "prereqs: unknown phase $phase"
				  unless $phase =~ /\A(?:configure|build|test|runtime|develop)\z/;
				next unless ref $pq->{$phase} eq 'HASH';
				for my $rel (sort keys %{ $pq->{$phase} })
				{
					push @p, "prereqs: $phase: unknown relation $rel"
					  unless $rel =~ /\A(?:requires|recommends|suggests|conflicts)\z/;
					my $deps = $pq->{$phase}{$rel};
					if (ref $deps ne 'HASH') { push @p, "prereqs: $phase: $rel is not a map"; next; }
					push @p, "prereqs: $phase: $rel: $_ has no valid version range"
					  for grep { !is_term($_) || !is_range($deps->{$_}) } sort keys %$deps;
				}
			}
		}
	}
	push @p, 'release_status is not stable, testing or unstable'
	  if exists $m->{release_status} && ($m->{release_status} // '') !~ /\A(?:stable|testing|unstable)\z/;
	if (exists $m->{tags})
	{
		push @p, 'tags is not a list of tags'
		  if ref $m->{tags} ne 'ARRAY' || grep { !is_tag($_) } @{ $m->{tags} };
	}
	if (exists $m->{resources})
	{
		my $r = $m->{resources};
		if (ref $r ne 'HASH') { push @p, 'resources is not a map'; }
		else
		{
			for my $k (sort keys %$r)
			{
				push @p, "resources: unknown key $k"
				  unless $k =~ /\A(?:homepage|bugtracker|repository)\z/ || $k =~ /\A[xX]_/;
			}
			push @p, 'resources: homepage is not a URL'
			  if exists $r->{homepage} && ($r->{homepage} // '') !~ m{\Ahttps?://};
			if (exists $r->{bugtracker})
			{
				my $b = $r->{bugtracker};
				push @p, 'resources: bugtracker has neither web nor mailto'
				  unless ref $b eq 'HASH' && (defined $b->{web} || defined $b->{mailto});
			}
			if (exists $r->{repository})
			{
				my $rp = $r->{repository};
				push @p, 'resources: repository has neither url nor web'
				  unless ref $rp eq 'HASH' && (defined $rp->{url} || defined $rp->{web});
			}
		}
	}
	return @p;
}

my $json = JSON::PP->new->canonical;
my $text = slurp("$root/META.json");
my $meta = eval { $json->decode($text) };
ok($meta, 'META.json is JSON') or diag($@);
is_deeply([ problems($meta) ], [], 'META.json follows the PGXN Meta Spec 1.0.0');

# It agrees with the extension it describes.
my $control = slurp("$root/voutbox.control");
my ($default_version) = $control =~ /^default_version\s*=\s*'([^']+)'/m;
is($meta->{version}, $default_version, 'its version is the control file\'s default_version');
is($meta->{provides}{voutbox}{version}, $default_version, 'so is the version of the extension it provides');
ok(-f "$root/voutbox--$default_version.sql" || -f "$root/voutbox--0.1.0.sql",
	'the version installs from the scripts in the repository');
my ($makefile_data) = slurp("$root/Makefile") =~ /^DATA\s*=\s*(.*)$/m;
like($makefile_data // '', qr/\Q$meta->{provides}{voutbox}{file}\E|\$\(wildcard/,
	'the file it names is installed by the Makefile');

# Each rule fails on a copy broken for it.
my %broken = (
	'no name'               => sub { delete $_[0]{name} },
	'name with a slash'     => sub { $_[0]{name} = 'v/outbox' },
	'version not SemVer'    => sub { $_[0]{version} = '0.4' },
	'unknown license'       => sub { $_[0]{license} = 'postgres' },
	'license without URL'   => sub { $_[0]{license} = { PostgreSQL => 'licence' } },
	'empty maintainer'      => sub { $_[0]{maintainer} = [] },
	'provides without file' => sub { delete $_[0]{provides}{voutbox}{file} },
	'provides missing file' => sub { $_[0]{provides}{voutbox}{file} = 'voutbox--9.9.9.sql' },
	'meta-spec 2'           => sub { $_[0]{'meta-spec'}{version} = '2.0.0' },
	'unknown phase'         => sub { $_[0]{prereqs}{install} = { requires => {} } },
	'bad version range'     => sub { $_[0]{prereqs}{runtime}{requires}{PostgreSQL} = '15' },
	'bad release_status'    => sub { $_[0]{release_status} = 'beta' },
	'unknown key'           => sub { $_[0]{homepage} = 'https://example.org' },
	'tag with a slash'      => sub { $_[0]{tags} = ['a/b'] },
	'repository without url or web' => sub { $_[0]{resources}{repository} = { type => 'git' } });
for my $case (sort keys %broken)
{
	my $copy = $json->decode($text);
	$broken{$case}->($copy);
	ok(scalar(problems($copy)) > 0, "a META.json with $case is refused");
}

done_testing();
