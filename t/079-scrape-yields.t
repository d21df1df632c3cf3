# m:collect() sends a large exposition in 256 KiB pieces and gives the
# worker back to its event loop between two of them, even when the client
# takes every piece at once (a scraper on loopback): another request that
# reaches the same worker while a scrape is being sent is served before
# the scrape's collect() returns, not after. With one worker the order is
# the server's own record (a shared dict counter): the other request's
# handler runs, then collect() returns.
#  - the scrape is complete (every series, exactly once) and ends as
#    usual; the other request answers 200
#  - the order holds for plain and for gzip bodies of several pieces
#  - an HTTP/1.0 scrape (curl -0, nginx's proxy_pass by default), whose
#    response the lua module buffers whole, gets the whole exposition
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use IO::Uncompress::Gunzip qw(gunzip $GunzipError);
use Time::HiRes qw(time);
use ShmpromTest qw(parse_metrics repo_root dechunk);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;

my $SERIES = 60000;
my $n = ShmpromTest->new(
    workers => 1,
    http    => '    lua_shared_dict t079 1m;',
    init    => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t079", size = "64m" }
        c = metrics:counter("t079_requests_total", "Requests by path.", {"path"})
LUA
    server => <<'CONF',
        location = /fill {
            content_by_lua_block {
                -- md5 labels: ~100 bytes a line, compressing poorly
                for i = 1, tonumber(ngx.var.arg_n) do
                    assert(c:inc(1, {"/" .. ngx.md5(i) .. ngx.md5(-i)}))
                end
                ngx.say("ok")
            }
        }
        # the scrape: records when its collect() returned
        location = /metrics {
            content_by_lua_block {
                metrics:collect()
                ngx.shared.t079:set("collect_done", ngx.shared.t079:incr("seq", 1, 0))
            }
        }
        # the other request: records when its handler ran
        location = /ping {
            content_by_lua_block {
                ngx.shared.t079:set("ping", ngx.shared.t079:incr("seq", 1, 0))
                ngx.say("pong")
            }
        }
        location = /order {
            content_by_lua_block {
                local d = ngx.shared.t079
                ngx.say(tostring(d:get("ping")), " ", tostring(d:get("collect_done")))
                d:flush_all()
            }
        }
CONF
);
$n->start;
is($n->get("/fill?n=$SERIES")->{content}, "ok\n", "$SERIES series");

# one raw request on a connection of its own (HTTP/1.1 unless told, the
# connection closed after the response): the socket, sent
sub send_req {
    my ($path, $hdr, $version) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $n->port, Proto => 'tcp')
        or die "connect: $!";
    $s->autoflush(1);
    print $s "GET $path HTTP/" . ($version // '1.1') . "\r\nHost: t\r\nConnection: close\r\n"
        . ($hdr // '') . "\r\n";
    return $s;
}

# a whole response read from a socket
sub read_all {
    my ($s) = @_;
    local $/;
    my $r = <$s>;
    close $s;
    return $r // '';
}

# a scrape read as fast as it comes; once its first 100 KB are in (the
# collect() loop has begun: 256 KiB pieces, several to go), /ping on another
# connection; both read to the end
sub scrape_with_ping {
    my ($hdr) = @_;
    my $a = send_req('/metrics', $hdr);
    my ($abuf, $bbuf, $b) = ('', '');
    my $sel = IO::Select->new($a);
    my $deadline = time + 30;
    while ($sel->count && time < $deadline) {
        for my $s ($sel->can_read(1)) {
            my $got = sysread($s, my $chunk, 65536);
            if (!$got) { $sel->remove($s); close $s; next }
            if ($s == $a) { $abuf .= $chunk } else { $bbuf .= $chunk }
        }
        if (!$b && length($abuf) > 100_000) {
            $b = send_req('/ping');
            $sel->add($b);
        }
    }
    return ($abuf, $bbuf);
}

for my $case (['plain', ''], ['gzip', "Accept-Encoding: gzip\r\n"]) {
    my ($what, $hdr) = @$case;
    my ($a, $b) = scrape_with_ping($hdr);
    my ($ahead, $abody) = split /\r\n\r\n/, $a, 2;
    $abody = dechunk($abody) // die "$what: malformed chunked body"
        if $ahead =~ /^Transfer-Encoding: chunked\r?$/mi;
    note "$what: " . length($abody) . " bytes sent";
    like($ahead, qr{^HTTP/1\.1 200}, "$what: the scrape answered 200");
    if ($what eq 'gzip') {
        like($ahead, qr/^Content-Encoding: gzip\r?$/mi, 'gzip: compressed');
        my $plain;
        gunzip(\$abody => \$plain) or die "gunzip: $GunzipError";
        $abody = $plain;
    }
    cmp_ok(length($abody), '>', 4 * 256 * 1024,
           "$what: a body of several 256 KiB pieces (" . length($abody) . " bytes)");
    my $p = parse_metrics($abody);
    my @lines = grep { /^t079_requests_total\{/ } split /\n/, $abody;
    is(scalar @lines, $SERIES, "$what: every series once");
    my ($bhead, $bbody) = split /\r\n\r\n/, $b, 2;
    $bbody = dechunk($bbody) // die "$what: malformed chunked /ping body"
        if ($bhead // '') =~ /^Transfer-Encoding: chunked\r?$/mi;
    ok($bhead =~ m{^HTTP/1\.1 200} && $bbody eq "pong\n", "$what: /ping answered 200");
    my ($ping, $done) = split ' ', $n->get('/order')->{content};
    ok($ping =~ /^\d+$/ && $done =~ /^\d+$/ && $ping < $done,
       "$what: /ping was served while the scrape was being sent (ping #$ping, collect() returned #$done)");
}

# HTTP/1.0 (curl -0; nginx's proxy_pass by default): the lua module
# buffers the whole response, and the body comes complete, in one piece
my $r10 = read_all(send_req('/metrics', '', '1.0'));
my ($h10, $b10) = split /\r\n\r\n/, $r10, 2;
like($h10, qr{^HTTP/1\.1 200}, 'HTTP/1.0: the scrape answered 200');
like($h10, qr/^Content-Length: (\d+)\r$/mi, 'HTTP/1.0: with a Content-Length');
my ($cl) = $h10 =~ /^Content-Length: (\d+)\r$/mi;
is(length($b10), $cl // -1, 'HTTP/1.0: the whole body');
is(scalar(grep { /^t079_requests_total\{/ } split /\n/, $b10), $SERIES, 'HTTP/1.0: every series once');
like($b10, qr/\n# EOF\n\z|\n\z/, 'HTTP/1.0: the body ends with a whole line');
is(scalar $n->error_lines, 0, 'no error lines') or diag join "\n", $n->error_lines;
$n->stop;
done_testing;
