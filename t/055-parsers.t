# The exposition, text 0.0.4 and OpenMetrics 1.0, read by independent
# parsers: Python's prometheus_client (both formats) and promtool (text),
# with tricky content: escaped label values, invalid UTF-8, +Inf/-Inf
# gauges, histograms, unlabelled metrics. Each format twice: as is, and
# through `curl --compressed` (gzip on the wire, as Prometheus asks for it).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempfile);
use ShmpromTest qw(parse_metrics repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing)" unless -e $LIB;
plan skip_all => "python3 with prometheus_client needed (scripts/install-deps.sh installs it)"
    unless system("python3 -c 'import prometheus_client' 2>/dev/null") == 0;

my $n = ShmpromTest->new(
    workers => 2,
    init    => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "p", size = "8m" }
        c1 = metrics:counter("p_requests_total", "Requests \\ with \n newline in help", {"path", "code"})
        g  = metrics:gauge("p_level", "Gauge with infinities", {"which"})
        h  = metrics:histogram("p_duration_seconds", "Latency", {"op"}, {0.001, 0.01, 0.1, 1})
        u  = metrics:counter("p_untouched_total", "Never incremented")
LUA
    server => <<'CONF',
        location = /fill {
            content_by_lua_block {
                assert(c1:inc(1, {'/a"b\\c', 200}))
                assert(c1:inc(2, {"/new\nline", "404"}))
                assert(c1:inc(3, {"bad\255utf8", "500"}))
                assert(c1:inc(4, {"", "200"}))
                assert(g:set(1/0, {"up"}))
                assert(g:set(-1/0, {"down"}))
                assert(g:set(0.125, {"mid"}))
                for i = 1, 100 do assert(h:observe(i / 200, {"read"})) end
                assert(h:observe(7, {"write"}))
                ngx.say("ok")
            }
        }
        location = /metrics { content_by_lua_block { metrics:collect() } }
CONF
);
$n->start;
is($n->get('/fill')->{status}, 200, 'series created');

my $have_curl = system('command -v curl >/dev/null') == 0;
diag 'curl not installed: the gzip cases are skipped' unless $have_curl;

# GET /metrics with curl --compressed: { status, headers, body (decompressed) }
sub curl_get {
    my (%h) = @_;
    my ($hf, $hfile) = tempfile(UNLINK => 1);
    my ($bf, $bfile) = tempfile(UNLINK => 1);
    system('curl', '-sS', '--compressed', '-o', $bfile, '-D', $hfile,
           (map { ('-H', "$_: $h{$_}") } keys %h), $n->url('/metrics'));
    my $head = do { local $/; open my $f, '<', $hfile or die; <$f> } // '';
    my $body = do { local $/; open my $f, '<', $bfile or die; binmode $f; <$f> } // '';
    my ($status) = $head =~ m{^HTTP/\S+ (\d+)};
    my %hdr = map { /^([^:]+):\s*(.*?)\r?$/ ? (lc $1, $2) : () } split /\n/, $head;
    return { status => $status // 599, headers => \%hdr, body => $body };
}

for my $case (qw(text openmetrics text+gzip openmetrics+gzip)) {
    my ($fmt, $gz) = split /\+/, $case;
    next if $gz && !$have_curl;
    my %h = $fmt eq 'openmetrics'
        ? (Accept => 'application/openmetrics-text; version=1.0.0,text/plain;q=0.5') : ();
    my $r = $gz ? curl_get(%h) : $n->get('/metrics', %h);
    my $what = $case;
    if ($gz) {
        is($r->{headers}{'content-encoding'}, 'gzip', "$what: gzip on the wire");
    }
    is($r->{status}, 200, "$what: 200");
    like($r->{headers}{'content-type'},
         $fmt eq 'openmetrics' ? qr{^application/openmetrics-text; version=1\.0\.0; charset=utf-8$}
                               : qr{^text/plain; version=0\.0\.4; charset=utf-8$},
         "$what: Content-Type");
    my ($fh, $file) = tempfile(UNLINK => 1);
    binmode $fh;
    print $fh $r->{body};
    close $fh;
    my @py = `python3 $FindBin::Bin/lib/parse_exposition.py $fmt $file`;
    is($?, 0, "$what: prometheus_client parses it") or diag join('', @py[0 .. ($#py < 20 ? $#py : 20)]);
    my %py;
    for (@py) {
        chomp;
        my ($k, $v) = split /\t/;
        $py{$k} = $v;
    }
    # our own parser, on the same body (OpenMetrics counters become _total samples)
    my $p = parse_metrics($r->{body});
    my %ours = %{ $p->{samples} };
    my @missing = grep { !exists $py{$_} } sort keys %ours;
    my @extra   = grep { !exists $ours{$_} } sort keys %py;
    # prometheus_client adds _created samples for OpenMetrics counters only if present; none here
    is_deeply(\@missing, [], "$what: every sample we read, prometheus_client read");
    is_deeply(\@extra, [], "$what: prometheus_client read no sample we did not");
    my @diff = grep { exists $py{$_} && !same($py{$_}, $ours{$_}) } sort keys %ours;
    is_deeply(\@diff, [], "$what: values agree") or diag map { "$_: $py{$_} vs $ours{$_}\n" } @diff;
    ok(exists $py{'p_requests_total{code="200",path="/a\\"b\\\\c"}'}, "$what: quote and backslash escaped");
    ok(exists $py{'p_requests_total{code="404",path="/new\\nline"}'}, "$what: newline escaped");
    ok(exists $py{"p_requests_total{code=\"500\",path=\"bad\x{fffd}utf8\"}"}
       || exists $py{"p_requests_total{code=\"500\",path=\"bad\xef\xbf\xbdutf8\"}"},
       "$what: invalid UTF-8 replaced by U+FFFD");
    is($py{'p_level{which="up"}'}, '+Inf', "$what: +Inf gauge");
    is($py{'p_level{which="down"}'}, '-Inf', "$what: -Inf gauge");
    is($py{'p_duration_seconds_count{op="read"}'} + 0, 100, "$what: histogram count");
    is($py{'p_duration_seconds_bucket{le="+Inf",op="read"}'} + 0, 100, "$what: +Inf bucket == count");
    is($py{'p_duration_seconds_bucket{le="0.001",op="write"}'} + 0, 0, "$what: empty buckets exported");
    is($py{'p_untouched_total'} + 0, 0, "$what: unlabelled counter at 0");
    if ($fmt eq 'text') {
        SKIP: {
            skip 'promtool not installed', 1 unless system('command -v promtool >/dev/null') == 0;
            my $out = `promtool check metrics < $file 2>&1`;
            is($?, 0, "$what: promtool check metrics passes") or diag $out;
        }
    } else {
        like($r->{body}, qr/\n# EOF\n\z/, "$what: ends with # EOF");
    }
}

sub same {
    my ($x, $y) = @_;
    return ($x =~ /NaN/i) == ($y =~ /NaN/i) if $x =~ /NaN/i || $y =~ /NaN/i;
    return ($x + 0) == ($y + 0) if $x =~ /Inf/i || $y =~ /Inf/i;
    return abs($x - $y) <= 1e-9 * (1 + abs($y));
}

$n->stop;
done_testing;
