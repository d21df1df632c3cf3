# Families defined in init_worker_by_lua (each worker defines them, at the
# same time): one family each in the output, counts exact across workers;
# a family defined both in init_by_lua and again in init_worker_by_lua is
# the same family.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ShmpromTest qw(parse_metrics metric_value metric_sum repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing)" unless -e $LIB;

my $n = ShmpromTest->new(
    workers     => 2,
    listen      => 'reuseport',
    init        => <<'LUA',
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "iw", size = "4m" }
        both = metrics:counter("iw_both_total", "Defined in init and init_worker", {"w"})
LUA
    init_worker => <<'LUA',
        metrics:init_worker()
        late = metrics:counter("iw_late_total", "Defined in init_worker only", {"route"})
        late_h = metrics:histogram("iw_late_seconds", "Defined in init_worker only", nil, {0.1, 1})
        both2 = metrics:counter("iw_both_total", "Defined in init and init_worker", {"w"})
        assert(both2 == both, "the same family object in this worker")
LUA
    server => <<'CONF',
        location = /hit {
            content_by_lua_block {
                assert(late:inc(1, {"hit"}))
                assert(late_h:observe(0.5))
                assert(both:inc(1, {ngx.worker.id()}))
                ngx.say(ngx.worker.pid())
            }
        }
        location = /metrics { content_by_lua_block { metrics:collect() } }
CONF
);
$n->start;
my $res = $n->load(requests => 4000, concurrency => 4, path => '/hit');
my $ok = $res->{status}{200} // 0;
is($ok, 4000, '4000 requests answered');
my $r = $n->get('/metrics');
my $p = parse_metrics($r->{body});
my @types = ($r->{body} =~ /^# TYPE (iw_\w+) /mg);
is_deeply([ sort @types ], [qw(iw_both_total iw_late_seconds iw_late_total)],
          'each family once in the output');
is(metric_value($p, 'iw_late_total', route => 'hit'), $ok, 'counter defined in init_worker: exact');
is(metric_value($p, 'iw_late_seconds_count'), $ok, 'histogram defined in init_worker: exact');
is(metric_sum($p, 'iw_both_total'), $ok, 'family defined in both phases: exact');
is(scalar $n->error_lines, 0, 'no error lines');
$n->stop;
done_testing;
