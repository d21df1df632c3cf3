# m:collect() answers a scraper whose Accept-Encoding takes gzip with the
# render gzip-compressed (by the render thread), and everyone else with the
# plain text. On a quiet server (no update between the scrapes) the
# decompressed body holds the same series, in the same order, with the same
# values as the plain one; only the self-metrics describing the previous
# render (its size and duration) may differ. Also: the headers (Content-Type,
# Content-Encoding, Vary), Accept-Encoding variants (q=0, "*", x-gzip, case),
# OpenMetrics, bodies of several 256 KiB pieces, nginx's own gzip filter on
# the same location (no double compression), the zone option gzip = false,
# render_nice (a zone at +19 still answers; bad values refused),
# and curl --compressed.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempfile);
use IO::Uncompress::Gunzip qw(gunzip $GunzipError);
use ShmpromTest qw(parse_metrics repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;

# labels from md5 digests compress poorly: the gzip body too spans several
# 256 KiB pieces
my $n = ShmpromTest->new(
    workers => 2,
    init    => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "gz", size = "32m" }
        c = metrics:counter("gz_requests_total", "Requests \\ by \"path\"\nand code", {"path", "code"})
        g = metrics:gauge("gz_level", "Gauge", {"which"})
        h = metrics:histogram("gz_duration_seconds", "Latency", {"op"}, {0.001, 0.01, 0.1, 1, 10})
        u = metrics:counter("gz_untouched_total", "Never incremented")
        plain_only = shmprom.new{ zone = "gz_off", size = "1m", gzip = false, render_nice = 0 }
        p = plain_only:counter("gz_off_total", "In a zone without gzip")
        niced = shmprom.new{ zone = "gz_nice", size = "1m", render_nice = 19 }
        niced:counter("gz_nice_total", "In a zone rendered at nice +19"):inc(5)
        opt_errors = {}
        for _, o in ipairs{ { gzip = "yes" }, { render_nice = 20 }, { render_nice = -1 },
                            { render_nice = 2.5 }, { render_nice = "5" } } do
            o.zone = "gz_bad"
            local ok, err = pcall(shmprom.new, o)
            opt_errors[#opt_errors + 1] = ok and "accepted" or tostring(err)
        end
LUA
    server => <<'CONF',
        location = /fill {
            content_by_lua_block {
                for i = 1, 40000 do
                    assert(c:inc(i % 977 + 0.5, {"/" .. ngx.md5(i) .. ngx.md5(-i), tostring(200 + i % 7)}))
                end
                assert(c:inc(1, {'/a"b\\c', "200"}))
                assert(c:inc(2, {"/new\nline", "404"}))
                assert(g:set(1/0, {"up"}))
                assert(g:set(-1/0, {"down"}))
                assert(g:set(0.125, {"mid"}))
                for i = 1, 2000 do assert(h:observe(i / 300, {ngx.md5(i)})) end
                assert(p:inc(3))
                ngx.say("ok")
            }
        }
        location = /metrics { content_by_lua_block { metrics:collect() } }
        location = /metrics-off { content_by_lua_block { plain_only:collect() } }
        location = /metrics-nice { content_by_lua_block { niced:collect() } }
        location = /opt-errors { content_by_lua_block { ngx.say(table.concat(opt_errors, "\n")) } }
        location = /metrics-nginx-gzip {
            gzip on;
            gzip_min_length 1;
            gzip_types text/plain application/openmetrics-text;
            content_by_lua_block { metrics:collect() }
        }
        location = /accepts {
            content_by_lua_block {
                local f = require("resty.shmprom")._accepts_gzip
                ngx.say(f(ngx.var.arg_ae and ngx.unescape_uri(ngx.var.arg_ae)) and "yes" or "no")
            }
        }
CONF
);
$n->start;
is($n->get('/fill')->{status}, 200, 'series created');

sub ungz {
    my ($gz) = @_;
    my $out;
    gunzip(\$gz => \$out) or return (undef, $GunzipError);
    return ($out, undef);
}

# lines of a body that may differ between two renders on a quiet server
sub stable_lines {
    return [ grep { !/^shmprom_render_(?:bytes|duration_seconds) / } split /\n/, $_[0] ];
}

my $CT_TEXT = qr{^text/plain; version=0\.0\.4; charset=utf-8$};
my $CT_OM   = qr{^application/openmetrics-text; version=1\.0\.0; charset=utf-8$};

for my $fmt (qw(text openmetrics)) {
    my %acc = $fmt eq 'openmetrics'
        ? (Accept => 'application/openmetrics-text; version=1.0.0,text/plain;q=0.5') : ();
    my $ct = $fmt eq 'openmetrics' ? $CT_OM : $CT_TEXT;

    my $plain = $n->get('/metrics', %acc);
    is($plain->{status}, 200, "$fmt plain: 200");
    like($plain->{headers}{'content-type'}, $ct, "$fmt plain: Content-Type");
    ok(!exists $plain->{headers}{'content-encoding'}, "$fmt plain: no Content-Encoding");
    is($plain->{headers}{vary}, 'Accept-Encoding', "$fmt plain: Vary: Accept-Encoding");
    cmp_ok(length $plain->{body}, '>', 4 * 256 * 1024, "$fmt plain: several pieces long");

    my $gz = $n->get('/metrics', %acc, 'Accept-Encoding' => 'gzip');
    is($gz->{status}, 200, "$fmt gzip: 200");
    like($gz->{headers}{'content-type'}, $ct, "$fmt gzip: Content-Type");
    is($gz->{headers}{'content-encoding'}, 'gzip', "$fmt gzip: Content-Encoding: gzip");
    is($gz->{headers}{vary}, 'Accept-Encoding', "$fmt gzip: Vary: Accept-Encoding");
    is(substr($gz->{body}, 0, 2), "\x1f\x8b", "$fmt gzip: a gzip member");
    cmp_ok(length $gz->{body}, '>', 256 * 1024, "$fmt gzip: more than one piece long");
    cmp_ok(length $gz->{body}, '<', length($plain->{body}) / 2, "$fmt gzip: smaller than half the text");
    my ($text, $err) = ungz($gz->{body});
    ok(defined $text, "$fmt gzip: decompresses") or diag $err;
    $text //= '';

    # series by series: same keys, same values
    my $pp = parse_metrics($plain->{body});
    my $pg = parse_metrics($text);
    my @keys_p = sort keys %{ $pp->{samples} };
    my @keys_g = sort keys %{ $pg->{samples} };
    is_deeply(\@keys_g, \@keys_p, "$fmt gzip: the same series as plain (" . scalar(@keys_p) . ')');
    my @diff = grep {
        !/^shmprom_render_(?:bytes|duration_seconds)\b/
            && ($pg->{samples}{$_} // 'none') ne ($pp->{samples}{$_} // 'none')
    } @keys_p;
    is_deeply(\@diff, [], "$fmt gzip: the same values as plain") or diag join("\n", @diff[0 .. 9]);
    is_deeply($pg->{type}, $pp->{type}, "$fmt gzip: the same TYPE lines");
    is_deeply($pg->{help}, $pp->{help}, "$fmt gzip: the same HELP lines");
    # and line by line, in the same order
    my ($lp, $lg) = (stable_lines($plain->{body}), stable_lines($text));
    ok(@$lp == @$lg && !grep({ $lp->[$_] ne $lg->[$_] } 0 .. $#$lp),
       "$fmt gzip: the same lines in the same order");
    if ($fmt eq 'openmetrics') {
        like($text, qr/\n# EOF\n\z/, 'openmetrics gzip: ends with # EOF');
    } else {
        like($text, qr/^gz_requests_total\{path="\/a\\"b\\\\c",code="200"\} 1$/m,
             'text gzip: escaped label value intact');
    }

    # nginx's gzip filter on the same location leaves the body alone
    my $ng = $n->get('/metrics-nginx-gzip', %acc, 'Accept-Encoding' => 'gzip');
    is($ng->{headers}{'content-encoding'}, 'gzip', "$fmt nginx gzip on: Content-Encoding: gzip");
    my ($once) = ungz($ng->{body});
    ok(defined $once && substr($once, 0, 2) ne "\x1f\x8b" && $once =~ /^# HELP /,
       "$fmt nginx gzip on: compressed once, not twice");
}

# Accept-Encoding variants
my %ae = (
    'gzip'                   => 'yes',
    'GZIP'                   => 'yes',
    'x-gzip'                 => 'yes',
    'deflate, gzip;q=1.0, *;q=0.5' => 'yes',
    'gzip;q=0.001'           => 'yes',
    'gzip;q=0'               => 'no',
    'gzip; q=0.0, identity'  => 'no',
    '*'                      => 'yes',
    '*;q=0'                  => 'no',
    'gzip;q=0, *'            => 'no',
    'br, deflate'            => 'no',
    'identity'               => 'no',
    ''                       => 'no',
);
for my $v (sort keys %ae) {
    (my $q = $v) =~ s/([^A-Za-z0-9_.~-])/sprintf('%%%02X', ord $1)/ge;
    is($n->get("/accepts?ae=$q")->{body}, "$ae{$v}\n", "Accept-Encoding '$v' takes gzip: $ae{$v}");
}
is($n->get('/accepts')->{body}, "no\n", 'no Accept-Encoding: plain');
for my $v ('gzip;q=0', 'br') {
    my $r = $n->get('/metrics', 'Accept-Encoding' => $v);
    ok(!exists $r->{headers}{'content-encoding'} && $r->{body} =~ /^# HELP /,
       "Accept-Encoding '$v': plain text served");
}
my $star = $n->get('/metrics', 'Accept-Encoding' => '*');
is($star->{headers}{'content-encoding'}, 'gzip', "Accept-Encoding '*': gzip served");

# a zone with gzip = false
my $off = $n->get('/metrics-off', 'Accept-Encoding' => 'gzip');
is($off->{status}, 200, 'gzip = false: 200');
ok(!exists $off->{headers}{'content-encoding'}, 'gzip = false: no Content-Encoding');
ok(!exists $off->{headers}{vary}, 'gzip = false: no Vary');
like($off->{body}, qr/^gz_off_total 3$/m, 'gzip = false: plain text');

# render_nice: a zone rendered at nice +19 still answers; bad values refused
my $nice = $n->get('/metrics-nice', 'Accept-Encoding' => 'gzip');
my ($nt) = ungz($nice->{body});
like($nt // '', qr/^gz_nice_total 5$/m, 'render_nice = 19: rendered and compressed');
my @oe = split /\n/, $n->get('/opt-errors')->{body};
is(scalar @oe, 5, 'five bad option sets tried');
like($oe[0], qr/'gzip' must be a boolean/, 'gzip = "yes" refused');
like($_, qr/'render_nice' must be a whole number 0-19/, 'bad render_nice refused') for @oe[1 .. 4];

# curl --compressed (asks for gzip, decompresses)
SKIP: {
    skip 'curl not installed', 4 unless system('command -v curl >/dev/null') == 0;
    my ($hf, $hfile) = tempfile(UNLINK => 1);
    my ($bf, $bfile) = tempfile(UNLINK => 1);
    my $url = $n->url('/metrics');
    system('curl', '-sS', '--compressed', '-o', $bfile, '-D', $hfile, $url);
    is($?, 0, 'curl --compressed: exit 0');
    my $head = do { local $/; open my $f, '<', $hfile or die; <$f> };
    like($head, qr/^Content-Encoding: gzip\r?$/mi, 'curl --compressed: gzip on the wire');
    my $body = do { local $/; open my $f, '<', $bfile or die; binmode $f; <$f> };
    my $p = eval { parse_metrics($body) };
    ok($p && keys %{ $p->{samples} } > 40000, 'curl --compressed: the body parses')
        or diag $@;
    ok($p && ($p->{samples}{'gz_level{which="mid"}'} // -1) == 0.125, 'curl --compressed: a value');
}

is_deeply([ $n->error_lines ], [], 'no errors logged');
$n->stop;
done_testing;
