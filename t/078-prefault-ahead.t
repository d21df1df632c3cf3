# The `prefault_ahead` zone option: each worker keeps the pages just past
# two of the zone's allocation frontiers (the cells' of its own plane, the
# key arena's) mapped, from init_worker and then a timer, so
# that a burst of new label sets takes no page fault for its key blocks and
# cells in the request that creates it.
#  - new histogram label sets in a zone with it take far fewer page faults
#    (getrusage RUSAGE_THREAD, in the worker) than the same in a zone
#    without it (`prefault_ahead = false`), both with the table resident
#  - after a burst moves the frontiers, the timer brings the window forward
#    again (the worker's marks move), and the next burst is as cheap
#  - defaults: a 64th of the zone, at most 4m; none with prefault = false
#    or prefault = true (the whole zone is there already); a bad value
#    raises at the caller's line; the gateway preset passes the option (and
#    cells_per_series) on
#  - every observation counted, exactly; no error line
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ShmpromTest qw(wait_until parse_metrics metric_sum repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;

my $INIT = <<'LUA';
        local shmprom = require "resty.shmprom"
        local b19 = {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4,
                     0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 10}
        Z = {
            on = shmprom.new{ zone = "t078_on", size = "24m", prefault_ahead = "1m" },
            off = shmprom.new{ zone = "t078_off", size = "24m", prefault_ahead = false },
        }
        H = {}
        for k, z in pairs(Z) do
            H[k] = z:histogram("t_ahead_seconds", "21 cells a label set.", {"path"}, b19)
        end
        defaults = {
            shmprom.new{ zone = "t078_d16", size = "16m" }.ahead_bytes,
            shmprom.new{ zone = "t078_d512", size = "512m", prefault = "table" }.ahead_bytes,
            shmprom.new{ zone = "t078_pf", size = "1m", prefault = true }.ahead_bytes,
            shmprom.new{ zone = "t078_none", size = "1m", prefault = false }.ahead_bytes,
            shmprom.new{ zone = "t078_none2", size = "1m", prefault = false, prefault_ahead = 65536 }.ahead_bytes,
        }
        local ok, e = pcall(function()
            local _ = shmprom.new{ zone = "t078_bad", prefault_ahead = "lots" } end)
        bad = e
        -- the gateway preset passes prefault_ahead and cells_per_series on
        local gw = require "resty.shmprom.gateway"
        gw_ahead = {
            gw.init{ zone = "t078_gw", size = "8m", module = false }.metrics.ahead_bytes,
            gw.init{ zone = "t078_gw0", size = "8m", module = false,
                     prefault_ahead = false, cells_per_series = 4 }.metrics.ahead_bytes,
        }
        local ok2, e2 = pcall(function()
            local _ = gw.init{ zone = "t078_gwbad", cells_per_series = 0.5 } end)
        gw_bad = e2
LUA
my @init_lines = split /\n/, $INIT;
my ($line_bad) = grep { $init_lines[$_ - 2] =~ /"t078_bad"/ } 2 .. @init_lines + 1;
my ($line_gwbad) = grep { $init_lines[$_ - 2] =~ /"t078_gwbad"/ } 2 .. @init_lines + 1;

my $n = ShmpromTest->new(
    workers     => 1,
    init        => $INIT,
    init_worker => '        Z.on:init_worker(); Z.off:init_worker()',
    server      => <<'NGX',
        # n new label sets /c/base.. in zone z: answers "faults failed",
        # the faults the worker's thread took in the loop alone (values
        # built before)
        location = /create {
            content_by_lua_block {
                local ffi = require "ffi"
                pcall(ffi.cdef, [[
                    typedef struct {
                        long ru_utime[2]; long ru_stime[2];
                        long ru_maxrss, ru_ixrss, ru_idrss, ru_isrss, ru_minflt,
                             ru_majflt, ru_nswap, ru_inblock, ru_oublock,
                             ru_msgsnd, ru_msgrcv, ru_nsignals, ru_nvcsw, ru_nivcsw;
                    } t078_rusage;
                    int getrusage(int who, t078_rusage *usage);
                ]])
                local ru = ffi.new("t078_rusage")
                local function faults()
                    assert(ffi.C.getrusage(1, ru) == 0)
                    return tonumber(ru.ru_minflt) + tonumber(ru.ru_majflt)
                end
                local h = H[ngx.var.arg_z]
                local base, n = tonumber(ngx.var.arg_base), tonumber(ngx.var.arg_n)
                local lv = {}
                for i = 1, n do lv[i] = { "/c/" .. (base + i) } end
                local failed = 0
                local f0 = faults()
                for i = 1, n do
                    if not h:observe(0.05, lv[i]) then failed = failed + 1 end
                end
                ngx.say(faults() - f0, " ", failed)
            }
        }
        location = /marks {
            content_by_lua_block {
                local m = Z.on.ahead
                ngx.say(m and (tonumber(m[0]) .. " " .. tonumber(m[1])) or "nil",
                        " ", tostring(Z.off.ahead))
            }
        }
        location = /info {
            content_by_lua_block {
                ngx.say(table.concat(defaults, " "))
                ngx.say(bad)
                ngx.say(table.concat(gw_ahead, " "))
                ngx.say(gw_bad)
            }
        }
        location = /metrics { content_by_lua_block { Z[ngx.var.arg_z]:collect() } }
NGX
);
$n->start;

my ($defs, $bad, $gw_ahead, $gw_bad) = split /\n/, $n->get('/info')->{content};
is($defs, join(' ', 16 * 1024 * 1024 / 64, 4 * 1024 * 1024, 0, 0, 65536),
   'defaults: a 64th of the zone, at most 4m; none with prefault true or false; given: kept');
like($bad, qr/^init_by_lua\(nginx\.conf:\d+\):$line_bad: shmprom\.new: 'prefault_ahead' must be false, a number of bytes or a string such as "4m", got lots$/,
     "a bad prefault_ahead raises at the caller's line ($line_bad)");
is($gw_ahead, join(' ', 8 * 1024 * 1024 / 64, 0), 'the gateway preset passes prefault_ahead on');
like($gw_bad, qr/^init_by_lua\(nginx\.conf:\d+\):$line_gwbad: resty\.shmprom\.gateway: shmprom\.new: 'cells_per_series' must be a number from 1 to 1024$/,
     "and cells_per_series: a bad one raises at the caller's line ($line_gwbad)");

# the worker's marks in the zone with the window ("cells keys"), and the other
# zone's ("nil": it keeps none)
my $marks = sub { $n->get('/marks')->{content} =~ /^(\d+ \d+|nil) (\S+)/ ? ($1, $2) : () };
my ($start, $off_marks) = $marks->();
like($start, qr/^[1-9]\d* [1-9]\d*$/, "init_worker brought the window in ($start)");
is($off_marks, 'nil', 'no window in the zone without it');

# 4000 new label sets a burst (672 KB of cells in the worker's plane, 96 KB
# of key blocks: ~188 pages; the window is 1m), the two zones in turns
my (%faults, $base);
my %made = (on => 0, off => 0);
for my $round (1 .. 3) {
    for my $z (qw(on off)) {
        $base += 10_000;
        my ($f, $failed) = split " ", $n->get("/create?z=$z&base=$base&n=4000")->{content};
        is($failed, 0, "round $round, zone $z: 4000 label sets made");
        $made{$z} += 4000;
        push @{ $faults{$z} }, $f;
    }
    # the window moves on after the burst, from the timer: the cells' and
    # the keys' marks at least as far past where they started as the
    # frontiers went (4000 x 21 cells x 8 bytes, 4000 one-block keys of 24
    # bytes a burst), to the page
    my ($c0, $k0) = split / /, $start;
    my $want_c = $c0 + int($round * 4000 * 21 * 8 / 4096) * 4096;
    my $want_k = $k0 + int($round * 4000 * 24 / 4096) * 4096;
    my $m;
    ok(wait_until(sub { ($m) = $marks->(); my ($c, $k) = split / /, $m // '0 0';
                        $c >= $want_c && $k >= $want_k }, timeout => 10),
       "round $round: the timer brought the window forward ($start -> $m)");
}
my @on = sort { $a <=> $b } @{ $faults{on} };
my @off = sort { $a <=> $b } @{ $faults{off} };
note "page faults per 4000 new label sets: with the window @{ $faults{on} }, without @{ $faults{off} }";
# the rest of the faults are the worker's Lua heap (the label cache
# growing), the same in both zones
cmp_ok($off[1] - $on[1], '>=', 120,
       'the zone without the window takes the ~188 faults of its key blocks and cells (median difference)');

for my $z (qw(on off)) {
    my $p = parse_metrics($n->get("/metrics?z=$z")->{content});
    is(metric_sum($p, 't_ahead_seconds_count'), $made{$z}, "zone $z: every observation counted");
}
is(scalar $n->error_lines, 0, 'no error lines') or diag join "\n", $n->error_lines;
$n->stop;
done_testing;
