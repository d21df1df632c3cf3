# The `prefault` zone option in nginx: shmprom.new{ prefault = true } in
# init_by_lua makes the whole zone resident in the master before the workers
# fork, and m:init_worker() maps it into each worker. Checked from outside,
# in /proc/PID/smaps: the zone's mapping (an anonymous shared mapping,
# "/dev/zero (deleted)", told apart by its size) has its full size in Rss in
# the master and in every worker, while a zone with `prefault = false`
# beside it stays nearly empty, and one with the default ("table") has its
# series table resident: about 22 % of it (17 of the ~77 bytes a zone
# budgets per series with 3 planes), not the arenas. The gateway preset passes the option through. Counts
# are exact and /metrics renders; a reload (the master prefaults the live
# zone again) keeps every count. A bad value raises at the caller's line.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;

# sizes that tell the zones apart in smaps
my %KB = (pf => 64 * 1024, plain => 48 * 1024, gw => 8 * 1024, def => 40 * 1024);

my $INIT = <<'LUA';
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t077", size = "64m", prefault = true }
        plain = shmprom.new{ zone = "t077_plain", size = "48m", prefault = false }
        default = shmprom.new{ zone = "t077_def", size = "40m" }
        m_req = metrics:counter("t_requests_total", "Requests.", {"w"})
        m_lat = metrics:histogram("t_seconds", "Latency.", {"path"}, {0.1, 1})
        local gw = require "resty.shmprom.gateway"
        gateway = gw.init{ zone = "t077_gw", size = "8m", prefault = true }
        -- bad values: raised at the line of the call (not a tail call,
        -- which would leave no caller's line to point at)
        local ok, e1 = pcall(function()
            local _ = shmprom.new{ zone = "t077_bad", prefault = "yes" } end)
        bad_new = e1
        local ok2, e2 = pcall(function()
            local _ = gw.init{ zone = "t077_bad_gw", prefault = 1 } end)
        bad_gw = e2
LUA
# the lines of the two bad calls in the init_by_lua chunk (its line 1 is the
# rest of the `init_by_lua_block {` line)
my @init_lines = split /\n/, $INIT;
my ($line_new) = grep { $init_lines[$_ - 2] =~ /"t077_bad"/ } 2 .. @init_lines + 1;
my ($line_gw) = grep { $init_lines[$_ - 2] =~ /"t077_bad_gw"/ } 2 .. @init_lines + 1;

my $n = ShmpromTest->new(
    workers => 2,
    listen  => 'reuseport',
    init    => $INIT,
    init_worker => <<'LUA',
        metrics:init_worker()
        plain:init_worker()
        default:init_worker()
        gateway.init_worker()
LUA
    server => <<'NGX',
        location = /hit {
            content_by_lua_block {
                assert(m_req:inc(1, { ngx.worker.id() }))
                assert(m_lat:observe(0.05, { "/hit/" .. (ngx.var.arg_i or "x") }))
                ngx.say("ok")
            }
        }
        location = /info {
            content_by_lua_block {
                ngx.say(tostring(metrics.prefault), " ", tostring(plain.prefault), " ",
                        tostring(default.prefault), " ", tostring(default.prefault_part))
                ngx.say(bad_new)
                ngx.say(bad_gw)
                local ok, err = metrics:check()
                ngx.say(ok and "check ok" or ("check: " .. tostring(err)))
            }
        }
        location = /metrics { content_by_lua_block { metrics:collect() } }
        location = /gw-metrics { content_by_lua_block { gateway.collect() } }
NGX
);

# Size and Rss (kB) of each anonymous shared mapping of process $pid. A
# zone whose table alone was prefaulted shows as two mappings (the kernel
# splits the area at the end of the range given MADV_HUGEPAGE): adjacent
# pieces of the same object (same inode) are added up.
sub zones_of {
    my ($pid) = @_;
    no warnings 'portable';    # 64-bit addresses through hex()
    open my $fh, '<', "/proc/$pid/smaps" or return [];
    my (@m, $cur);
    while (my $l = <$fh>) {
        if ($l =~ /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$/) {
            $cur = { start => hex($1), end => hex($2), inode => $3, name => $4 };
            push @m, $cur;
        } elsif ($cur && $l =~ /^(Size|Rss):\s+(\d+) kB/) {
            $cur->{$1} = $2;
        }
    }
    close $fh;
    my @z;
    for my $x (grep { $_->{name} =~ m{^/dev/zero} } @m) {
        if (@z && $z[-1]{end} == $x->{start} && $z[-1]{inode} == $x->{inode}) {
            $z[-1]{end} = $x->{end};
            $z[-1]{$_} += $x->{$_} // 0 for qw(Size Rss);
        } else {
            push @z, { %$x };
        }
    }
    return \@z;
}

# Rss (kB) of the zone of size $kb in process $pid; undef when not found
sub rss_of {
    my ($pid, $kb) = @_;
    my @z = grep { ($_->{Size} // 0) == $kb } @{ zones_of($pid) };
    return @z == 1 ? $z[0]{Rss} : undef;
}

# $master_ran_init: whether the running master is the process that ran
# init_by_lua. At start it is not: with `daemon on` the process that ran it
# forks the master, which, like a worker, inherits the zone's pages but not
# their page table entries (so its Rss says nothing). After a reload it is.
sub check_resident {
    my ($what, $master_ran_init) = @_;
    my $m = $n->master_pid;
    if ($master_ran_init) {
        is(rss_of($m, $KB{pf}), $KB{pf}, "$what: the prefaulted zone is resident in the master");
        is(rss_of($m, $KB{gw}), $KB{gw}, "$what: the gateway's prefaulted zone too");
    }
    my $plain = rss_of($m, $KB{plain});
    ok(defined $plain && $plain < $KB{plain} / 10,
       "$what: the zone without prefault is not (" . ($plain // '?') . " kB of $KB{plain})");
    # the default: the table only
    my $table_ok = sub { my ($kb) = @_; defined $kb && $kb > 0.15 * $KB{def} && $kb < 0.35 * $KB{def} };
    if ($master_ran_init) {
        my $d = rss_of($m, $KB{def});
        ok($table_ok->($d), "$what: the default zone has its table resident in the master ("
                            . ($d // '?') . " kB of $KB{def})");
    }
    my @w = $n->worker_pids;
    is(scalar @w, 2, "$what: two workers");
    for my $w (@w) {
        my $d;
        ok(wait_until(sub { $d = rss_of($w, $KB{def}); $table_ok->($d) }, timeout => 10),
           "$what: worker $w has the default zone's table mapped, not the rest (" . ($d // "?") . " kB of $KB{def})");
    }
    for my $w (@w) {
        # init_worker maps it: wait for a worker still starting
        my $ok = wait_until(sub { (rss_of($w, $KB{pf}) // 0) == $KB{pf}
                                  && (rss_of($w, $KB{gw}) // 0) == $KB{gw} }, timeout => 10);
        ok($ok, "$what: worker $w has both prefaulted zones mapped (Rss "
                . (rss_of($w, $KB{pf}) // '?') . " and " . (rss_of($w, $KB{gw}) // '?') . " kB)");
        my $p = rss_of($w, $KB{plain});
        ok(defined $p && $p < $KB{plain} / 10, "$what: worker $w: the other zone is not (" . ($p // '?') . ' kB)');
    }
}

$n->start;
check_resident('start', 0);

my $info = $n->get('/info')->{content};
my ($methods, $bad_new, $bad_gw, $check) = split /\n/, $info;
like($methods, qr/^(madvise|touch) nil (madvise|touch) table$/, "the zones report how they were prefaulted ($methods)");
like($bad_new, qr/^init_by_lua\(nginx\.conf:\d+\):$line_new: shmprom\.new: 'prefault' must be true, false or "table"$/,
     "shmprom.new: a bad prefault value raises at the caller's line ($line_new)");
like($bad_gw, qr/^init_by_lua\(nginx\.conf:\d+\):$line_gw: resty\.shmprom\.gateway: shmprom\.new: 'prefault' must be true, false or "table"$/,
     "gateway.init: the same, through the preset ($line_gw)");
is($check, 'check ok', 'the zone checks');

my $res = $n->load(requests => 3000, concurrency => 4, path => '/hit?i=1');
is($res->{status}{200} // 0, 3000, '3000 requests answered');
my $p = parse_metrics($n->get('/metrics')->{content});
is(metric_sum($p, 't_requests_total'), 3000, 'counter: exact');
is(metric_value($p, 't_seconds_count', path => '/hit/1'), 3000, 'histogram: exact');
is(metric_value($p, 't_seconds_bucket', path => '/hit/1', le => '0.1'), 3000, 'histogram bucket: exact');
like($n->get('/gw-metrics')->{content}, qr/^# TYPE dfs_gateway_requests_total counter$/m,
     'the gateway zone renders');

# a reload: the master prefaults the live zone again; no count moves
$n->reload(wait_old => 1);
check_resident('after a reload', 1);
$res = $n->load(requests => 1000, concurrency => 4, path => '/hit?i=2');
is($res->{status}{200} // 0, 1000, '1000 more requests answered');
$p = parse_metrics($n->get('/metrics')->{content});
is(metric_sum($p, 't_requests_total'), 4000, 'counter exact across the reload');
is(metric_value($p, 't_seconds_count', path => '/hit/1'), 3000, 'old series kept');
is(metric_value($p, 't_seconds_count', path => '/hit/2'), 1000, 'new series exact');
is(scalar $n->error_lines, 0, 'no error lines') or diag join "\n", $n->error_lines;
$n->stop;
done_testing;
