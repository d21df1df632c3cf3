# Issue 7.6: hostile and wrong input through real requests. Each case gets
# a clear error (updates return nil, err: the handler puts err in the body;
# definitions raise: the handler pcall()s them and returns the message) or
# is accepted and comes out correctly escaped. Throughout, the workers
# survive (same pids before and after) and nothing else is lost (a control
# counter, incremented by every request, stays exact).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempfile);
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until parse_metrics metric_sum metric_value metric_series repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)"
    unless -e $LIB || $ENV{SHMPROM_LUA_PATH};

my $t_start = time;

my $init = <<'LUA';
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t074", size = "32m" }
        m_ctl   = metrics:counter("t_ctl_total", "Control: one per test request.")
        m_plain = metrics:counter("t_plain_total", "Unlabelled.")
        m_one   = metrics:counter("t_one_total", "One label.", {"v"})
        m_two   = metrics:counter("t_two_total", "Two labels.", {"a", "b"})
        m_g     = metrics:gauge("t_g", "A gauge.", {"v"})
        m_h     = metrics:histogram("t_hist_seconds", "A histogram.", {"v"}, {0.1, 1})
        m_lv    = metrics:counter("t_lv_total", "Label values from the request.", {"v"})
        m_many  = metrics:counter("t_many_total", "10k label sets.", {"i"})
        m_five  = metrics:counter("t_five_total", "Five labels.", {"a", "b", "c", "d", "e"})

        local nan, inf = 0/0, math.huge
        -- update cases: name -> function returning ok, err (never raising)
        cases = {
            labels_too_few   = function() return m_two:inc(1, {"x"}) end,
            labels_too_many  = function() return m_two:inc(1, {"x", "y", "z"}) end,
            labels_missing   = function() return m_two:inc(1) end,
            labels_string    = function() return m_two:inc(1, "x") end,
            args_too_many    = function() return m_two:inc(1, "x", "y", "z") end,
            args_unwanted    = function() return m_plain:inc(1, "x") end,
            args_boolean     = function() return m_one:inc(1, true) end,
            args_nan         = function() return m_h:observe(1, nan) end,
            args_five        = function() return m_five:inc(1, "a", "b", "c", "d") end,
            args_ok          = function() return m_one:inc(2, "args") end,
            labels_unwanted  = function() return m_plain:inc(1, {"x"}) end,
            label_nil        = function() return m_two:inc(1, {nil, "y"}) end,
            label_nil_last   = function() return m_two:inc(1, {"x", nil}) end,
            label_boolean    = function() return m_one:inc(1, {true}) end,
            label_table      = function() return m_one:inc(1, {{}}) end,
            label_function   = function() return m_one:inc(1, {print}) end,
            label_cdata      = function() return m_one:inc(1, {require("ffi").new("int", 1)}) end,
            label_nan        = function() return m_one:inc(1, {nan}) end,
            label_inf        = function() return m_one:inc(1, {inf}) end,
            label_neg_inf    = function() return m_one:inc(1, {-inf}) end,
            label_int        = function() return m_one:inc(1, {42}) end,
            label_float      = function() return m_one:inc(1, {1.5}) end,
            label_negative   = function() return m_one:inc(1, {-3}) end,
            counter_nan      = function() return m_one:inc(nan, {"n"}) end,
            counter_inf      = function() return m_one:inc(inf, {"n"}) end,
            counter_neg      = function() return m_one:inc(-1, {"n"}) end,
            counter_neg_inf  = function() return m_one:inc(-inf, {"n"}) end,
            counter_string   = function() return m_one:inc("5", {"n"}) end,
            counter_zero     = function() return m_one:inc(0, {"zero"}) end,
            gauge_inc_nan    = function() return m_g:inc(nan, {"g"}) end,
            gauge_inc_inf    = function() return m_g:inc(inf, {"g"}) end,
            gauge_dec_nan    = function() return m_g:dec(nan, {"g"}) end,
            gauge_set_string = function() return m_g:set("1", {"g"}) end,
            gauge_set_nan    = function() return m_g:set(nan, {"nan"}) end,
            gauge_set_inf    = function() return m_g:set(inf, {"inf"}) end,
            gauge_set_neg_inf = function() return m_g:set(-inf, {"-inf"}) end,
            hist_nan         = function() return m_h:observe(nan, {"h"}) end,
            hist_inf         = function() return m_h:observe(inf, {"h"}) end,
            hist_neg_inf     = function() return m_h:observe(-inf, {"h"}) end,
            hist_nil         = function() return m_h:observe(nil, {"h"}) end,
            handle_bad_label = function() return m_one:labels(true) end,
            handle_neg       = function() return m_one:labels("hd"):inc(-1) end,
            handle_nan       = function() return m_one:labels("hd"):inc(nan) end,
            handle_hist_nan  = function() return m_h:labels("hd"):observe(nan) end,
            handle_set_on_counter = function() return m_one:labels("hd"):set(1) end,
            del_too_few      = function() return m_two:del({"x"}) end,
            del_boolean      = function() return m_one:del({true}) end,
            label_10k        = function() return m_lv:inc(1, {string.rep("k", 10000)}) end,
            labels_total_17k = function() return m_two:inc(1, {string.rep("a", 9000), string.rep("b", 9000)}) end,
        }

        -- definition cases: name -> function that should raise
        defs = {
            name_digit      = function() return metrics:counter("1bad", "x") end,
            name_dash       = function() return metrics:counter("bad-name", "x") end,
            name_empty      = function() return metrics:counter("", "x") end,
            name_space      = function() return metrics:counter("bad name", "x") end,
            name_utf8       = function() return metrics:counter("caf\195\169_total", "x") end,
            name_number     = function() return metrics:counter(42, "x") end,
            name_reserved   = function() return metrics:counter("shmprom_mine_total", "x") end,
            label_dash      = function() return metrics:counter("t_d1_total", "x", {"bad-label"}) end,
            label_reserved  = function() return metrics:counter("t_d2_total", "x", {"__name"}) end,
            label_digit     = function() return metrics:counter("t_d3_total", "x", {"1a"}) end,
            label_number    = function() return metrics:counter("t_d4_total", "x", {1}) end,
            label_dup       = function() return metrics:counter("t_d5_total", "x", {"a", "a"}) end,
            label_colon     = function() return metrics:counter("t_d6_total", "x", {"a:b"}) end,
            labels_not_list = function() return metrics:counter("t_d7_total", "x", {a = "b"}) end,
            hist_le         = function() return metrics:histogram("t_d8_seconds", "x", {"le"}) end,
            hist_le_second  = function() return metrics:histogram("t_d9_seconds", "x", {"v", "le"}) end,
            buckets_order   = function() return metrics:histogram("t_d10_seconds", "x", nil, {1, 0.5}) end,
            buckets_nan     = function() return metrics:histogram("t_d11_seconds", "x", nil, {0/0}) end,
            buckets_string  = function() return metrics:histogram("t_d12_seconds", "x", nil, {"a"}) end,
            redefine_kind   = function() return metrics:gauge("t_one_total", "One label.", {"v"}) end,
            redefine_labels = function() return metrics:counter("t_one_total", "One label.", {"v", "w"}) end,
            redefine_nolabels = function() return metrics:counter("t_one_total", "One label.") end,
            redefine_buckets = function() return metrics:histogram("t_hist_seconds", "A histogram.", {"v"}, {0.5}) end,
            redefine_help   = function() return metrics:counter("t_one_total", "Other help.", {"v"}) end,
            redefine_mode   = function() return metrics:gauge("t_g", "A gauge.", {"v"}, {mode = "livesum"}) end,
            bad_mode        = function() return metrics:gauge("t_d13", "x", nil, {mode = "sometimes"}) end,
            help_number     = function() return metrics:counter("t_d14_total", 5) end,
        }
LUA

my $server = <<'NGX';
        client_max_body_size 4m;
        client_body_buffer_size 4m;
        location ~ ^/case/(?<case>\w+)$ {
            content_by_lua_block {
                m_ctl:inc()
                local f = cases[ngx.var.case]
                if not f then ngx.status = 404 ngx.say("no such case") return end
                local ok, err = f()
                if ok then ngx.say("OK") else ngx.say("ERR ", tostring(err)) end
            }
        }
        location ~ ^/def/(?<case>\w+)$ {
            content_by_lua_block {
                m_ctl:inc()
                local f = defs[ngx.var.case]
                if not f then ngx.status = 404 ngx.say("no such case") return end
                local ok, err = pcall(f)
                if ok then ngx.say("DEFINED") else ngx.say("RAISED ", tostring(err)) end
            }
        }
        # a label value straight from the request (query argument v, %-decoded)
        location = /lv {
            content_by_lua_block {
                m_ctl:inc()
                local v = ngx.unescape_uri(ngx.var.arg_v or "")
                local ok, err = m_lv:inc(1, { v })
                ngx.header["X-Len"] = #v
                if ok then ngx.say("OK") else ngx.say("ERR ", tostring(err)) end
            }
        }
        # the request body as a label value
        location = /big {
            content_by_lua_block {
                m_ctl:inc()
                ngx.req.read_body()
                local v = ngx.req.get_body_data() or ""
                ngx.header["X-Len"] = #v
                local ok, err = m_lv:inc(1, { v })
                if ok then ngx.say("OK") else ngx.say("ERR ", tostring(err)) end
                local h, herr = m_lv:labels(v)
                ngx.say(h and "HANDLE" or ("HANDLE-ERR " .. tostring(herr)))
            }
        }
        # 10k label sets in one request
        location = /many {
            content_by_lua_block {
                m_ctl:inc()
                local good, bad, first = 0, 0, nil
                for i = 1, 10000 do
                    local ok, err = m_many:inc(1, { "s" .. i })
                    if ok then good = good + 1 else bad = bad + 1 first = first or err end
                end
                ngx.say(good, " ", bad, " ", tostring(first))
            }
        }
        location = /metrics { content_by_lua_block { metrics:collect() } }
        location = /check {
            content_by_lua_block {
                local s, err = metrics:check()
                ngx.say(s or ("FAILED " .. tostring(err)))
            }
        }
NGX

my $n = ShmpromTest->new(workers => 2, init => $init, init_worker => '        metrics:init_worker()',
                         server => $server);
$n->start_ok('nginx starts');
my @pids0 = $n->worker_pids;
my $sent = 0;    # requests that increment t_ctl_total

my $body = '';
sub scrape {
    my (%h) = @_;
    my $r = $n->get('/metrics', %h);
    $body = $r->{body};
    return undef unless $r->{status} == 200;
    my $p = eval { parse_metrics($r->{body}) };
    diag "parse error: $@" unless $p;
    return $p;
}
sub errs { my ($p, $kind) = @_; return metric_value($p, 'shmprom_errors_total', kind => $kind) // 0 }

sub call {
    my ($path) = @_;
    my $r = $n->get($path);
    $sent++;
    is($r->{status}, 200, "$path answers 200") unless $r->{status} == 200;
    my $b = $r->{body} // '';
    chomp $b;
    return $b;
}

my $p0 = scrape() or BAIL_OUT('no /metrics');

# ---------------------------------------------------------------- updates
# [ case, expected: 'OK' or a regex the error must match, error kind counted ]
my @update_cases = (
    [ labels_too_few   => qr/t_two_total: expected 2 label values, got 1/, 'bad_labels' ],
    [ labels_too_many  => qr/t_two_total: expected 2 label values, got more/, 'bad_labels' ],
    [ labels_missing   => qr/t_two_total: expected 2 label values, got 0/, 'bad_labels' ],
    # label values may also follow the value as arguments (up to 4)
    [ labels_string    => qr/t_two_total: expected 2 label values, got 1/, 'bad_labels' ],
    [ args_too_many    => qr/t_two_total: expected 2 label values, got more/, 'bad_labels' ],
    [ args_unwanted    => qr/t_plain_total: takes no label values/, 'bad_labels' ],
    [ args_boolean     => qr/label value for 'v' is a boolean, expected a string or number/, 'bad_labels' ],
    [ args_nan         => qr/label value for 'v' is not a finite number/, 'bad_labels' ],
    [ args_five        => qr/t_five_total: takes 5 label values: pass more than 4 as a table/, 'bad_labels' ],
    [ args_ok          => 'OK' ],
    [ labels_unwanted  => qr/t_plain_total: takes no label values/, 'bad_labels' ],
    [ label_nil        => qr/t_two_total: expected 2 label values, got 0/, 'bad_labels' ],
    [ label_nil_last   => qr/t_two_total: expected 2 label values, got 1/, 'bad_labels' ],
    [ label_boolean    => qr/label value for 'v' is a boolean, expected a string or number/, 'bad_labels' ],
    [ label_table      => qr/label value for 'v' is a table/, 'bad_labels' ],
    [ label_function   => qr/label value for 'v' is a function/, 'bad_labels' ],
    [ label_cdata      => qr/label value for 'v' is a cdata/, 'bad_labels' ],
    [ label_nan        => qr/label value for 'v' is not a finite number/, 'bad_labels' ],
    [ label_inf        => qr/label value for 'v' is not a finite number/, 'bad_labels' ],
    [ label_neg_inf    => qr/label value for 'v' is not a finite number/, 'bad_labels' ],
    [ label_int        => 'OK' ],
    [ label_float      => 'OK' ],
    [ label_negative   => 'OK' ],
    [ counter_nan      => qr/counter increment must be a finite number >= 0, got (?:-?nan)/i, 'bad_value' ],
    [ counter_inf      => qr/counter increment must be a finite number >= 0, got inf/i, 'bad_value' ],
    [ counter_neg      => qr/counter increment must be a finite number >= 0, got -1/, 'bad_value' ],
    [ counter_neg_inf  => qr/counter increment must be a finite number >= 0, got -inf/i, 'bad_value' ],
    [ counter_string   => qr/counter increment must be a finite number >= 0, got 5/, 'bad_value' ],
    [ counter_zero     => 'OK' ],
    [ gauge_inc_nan    => qr/gauge increment must be a finite number/, 'bad_value' ],
    [ gauge_inc_inf    => qr/gauge increment must be a finite number/, 'bad_value' ],
    [ gauge_dec_nan    => qr/gauge decrement must be a finite number/, 'bad_value' ],
    [ gauge_set_string => qr/gauge value must be a number, got string/, 'bad_value' ],
    # a gauge may hold NaN and +-Inf (Prometheus allows them): accepted
    [ gauge_set_nan    => 'OK' ],
    [ gauge_set_inf    => 'OK' ],
    [ gauge_set_neg_inf => 'OK' ],
    [ hist_nan         => qr/observation must be a finite number/, 'bad_value' ],
    [ hist_inf         => qr/observation must be a finite number/, 'bad_value' ],
    [ hist_neg_inf     => qr/observation must be a finite number/, 'bad_value' ],
    [ hist_nil         => qr/observation must be a finite number, got nil/, 'bad_value' ],
    [ handle_bad_label => qr/label value for 'v' is a boolean/, 'bad_labels' ],
    [ handle_neg       => qr/bad increment -1/, 'bad_value' ],
    [ handle_nan       => qr/bad increment (?:-?nan)/i, 'bad_value' ],
    [ handle_hist_nan  => qr/bad observation (?:-?nan)/i, 'bad_value' ],
    [ handle_set_on_counter => qr/bad gauge value/, 'bad_value' ],
    [ del_too_few      => qr/expected 2 string or number label values/, 'bad_labels' ],
    [ del_boolean      => qr/expected 1 string or number label values/, 'bad_labels' ],
    [ label_10k        => 'OK' ],
    [ labels_total_17k => qr/label values too long \(more than 16384 bytes in all\)/, 'key_too_long' ],
);

my %kinds0 = map { $_ => errs($p0, $_) } qw(bad_value bad_labels key_too_long series_dropped internal stuck_insert);
my %want_kind;
subtest 'updates: clear errors, never raising' => sub {
    for my $c (@update_cases) {
        my ($name, $want, $kind) = @$c;
        my $b = call("/case/$name");
        if (!ref $want) {
            is($b, 'OK', "$name: accepted");
        } else {
            like($b, qr/^ERR .*$want/, "$name: $b");
            $want_kind{$kind}++;
        }
    }
};

# ---------------------------------------------------------------- definitions
my @def_cases = (
    [ name_digit        => qr/invalid metric name '1bad'/ ],
    [ name_dash         => qr/invalid metric name 'bad-name'/ ],
    [ name_empty        => qr/invalid metric name ''/ ],
    [ name_space        => qr/invalid metric name 'bad name'/ ],
    [ name_utf8         => qr/invalid metric name 'caf\x{c3}\x{a9}_total'/ ],
    [ name_number       => qr/metric name must be a string/ ],
    [ name_reserved     => qr/shmprom_ prefix is reserved/ ],
    [ label_dash        => qr/invalid label name 'bad-label'/ ],
    [ label_reserved    => qr/invalid label name '__name'.*__/ ],
    [ label_digit       => qr/invalid label name '1a'/ ],
    [ label_number      => qr/label name #1 is not a string/ ],
    [ label_dup         => qr/duplicate label name 'a'/ ],
    [ label_colon       => qr/invalid label name 'a:b'/ ],
    [ labels_not_list   => qr/label names must be a list/ ],
    [ hist_le           => qr/label name 'le' is reserved/ ],
    [ hist_le_second    => qr/label name 'le' is reserved/ ],
    [ buckets_order     => qr/buckets must be strictly increasing/ ],
    [ buckets_nan       => qr/bucket 1 is not a finite number/ ],
    [ buckets_string    => qr/bucket #1 is not a number/ ],
    [ redefine_kind     => qr/'t_one_total' is already defined as counter.*cannot redefine it as gauge/ ],
    [ redefine_labels   => qr/'t_one_total' is already defined as .*cannot redefine/ ],
    [ redefine_nolabels => qr/'t_one_total' is already defined as .*cannot redefine/ ],
    [ redefine_buckets  => qr/'t_hist_seconds' is already defined as .*cannot redefine/ ],
    [ redefine_help     => qr/'t_one_total' is already defined with another help text/ ],
    [ redefine_mode     => qr/'t_g' is already defined as .*cannot redefine/ ],
    [ bad_mode          => qr/unknown gauge mode 'sometimes'/ ],
    [ help_number       => qr/help must be a string/ ],
);
my $chk0 = call('/check'); $sent--;    # /check does not count
subtest 'definitions: raise, naming the problem' => sub {
    for my $c (@def_cases) {
        my ($name, $want) = @$c;
        my $b = call("/def/$name");
        like($b, qr/^RAISED .*$want/, "$name: $b");
    }
};
my $chk1 = call('/check'); $sent--;
my ($fam0) = $chk0 =~ /(\d+) families/;
my ($fam1) = $chk1 =~ /(\d+) families/;
is($fam1, $fam0, "refused definitions took no family record ($chk1)");

# ---------------------------------------------------------------- label values from requests
sub uri_escape { my ($s) = @_; $s =~ s/([^A-Za-z0-9_.~-])/sprintf('%%%02X', ord $1)/ge; return $s }
my @values = (
    [ 'double quote',      qq{a"b} ],
    [ 'backslash',         q{a\\b} ],
    [ 'trailing backslash', q{end\\} ],
    [ 'newline',           "a\nb" ],
    [ 'all three',         qq{\\"\n\\n"} ],
    [ 'carriage return and tab', "a\r\tb" ],
    [ 'braces and commas', 'x},y="z",w={' ],
    [ 'empty',             '' ],
    [ 'utf-8',             "h\xc3\xa9llo \xe2\x98\x83" ],
    [ 'NUL byte',          "a\0b" ],
    [ 'looks escaped',     q{\\n\\"} ],
);
my @invalid = (
    [ 'invalid UTF-8 \xff\xfe',      "\xff\xfe",         "\xef\xbf\xbd\xef\xbf\xbd" ],
    [ 'truncated UTF-8 sequence',    "ab\xe2\x98",       "ab\xef\xbf\xbd" ],
    [ 'overlong encoding of /',      "x\xc0\xaf",        "x\xef\xbf\xbd\xef\xbf\xbd" ],
    [ 'UTF-16 surrogate as UTF-8',   "\xed\xa0\x80",     "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" ],
);
subtest 'label values from requests' => sub {
    for my $v (@values, @invalid) {
        my $b = call('/lv?v=' . uri_escape($v->[1]));
        is($b, 'OK', "$v->[0]: accepted");
    }
};

# ---------------------------------------------------------------- 1 MB label value
subtest '1 MB label value' => sub {
    my $mark = $n->log_mark;
    my $r = $n->request(POST => '/big', content => 'x' x (1 << 20));
    $sent++;
    is($r->{status}, 200, 'request answered');
    is($r->{headers}{'x-len'}, 1 << 20, 'the handler got the whole 1 MB');
    like($r->{body}, qr/^ERR t_lv_total: label values too long \(more than \d+ bytes in all\)\n/, 'clear error')
        or diag substr($r->{body}, 0, 300);
    like($r->{body}, qr/\nHANDLE-ERR t_lv_total: label values too long/, 'labels() gives the same error');
    $want_kind{key_too_long} += 2;
    my @lines = grep { /too long/ } split /\n/, $n->error_log(since => $mark);
    ok(!grep({ length > 4096 } @lines), 'the log line does not carry the value');
};

# ---------------------------------------------------------------- 10k label sets
subtest '10k label sets in one request' => sub {
    my $t0 = time;
    my $b = call('/many');
    is($b, '10000 0 nil', sprintf('10000 label sets counted, none refused (%.2f s)', time - $t0));
};

# ---------------------------------------------------------------- the output
my $p = scrape();
ok($p, '/metrics parses after the hostile input') or diag substr($body, 0, 3000);
$p ||= { list => [], samples => {}, type => {} };
{
    my $copy = $body;
    ok(utf8::decode($copy), 'the exposition is valid UTF-8');
}

subtest 'escaping' => sub {
    for my $v (@values) {
        is(metric_value($p, 't_lv_total', v => $v->[1]), 1, "$v->[0]: round-trips through the exposition");
    }
    for my $v (@invalid) {
        is(metric_value($p, 't_lv_total', v => $v->[2]), 1, "$v->[0]: comes out with U+FFFD");
    }
    like($body, qr/^t_lv_total\{v="a\\"b"\} 1$/m, 'raw line: \\" for a double quote');
    like($body, qr/^t_lv_total\{v="a\\\\b"\} 1$/m, 'raw line: \\\\ for a backslash');
    like($body, qr/^t_lv_total\{v="a\\nb"\} 1$/m, 'raw line: \\n for a newline');
    is(metric_value($p, 't_lv_total', v => 'k' x 10000), 1, '10000-byte label value accepted and exported');
    is(metric_value($p, 't_one_total', v => '42'), 1, 'integer label value as "42"');
    is(metric_value($p, 't_one_total', v => '1.5'), 1, 'float label value as "1.5"');
    is(metric_value($p, 't_one_total', v => '-3'), 1, 'negative label value as "-3"');
    is(metric_value($p, 't_one_total', v => 'zero'), 0, 'inc(0) makes the series at 0');
    like($body, qr/^t_g\{v="nan"\} NaN$/m, 'gauge set to NaN renders NaN');
    like($body, qr/^t_g\{v="inf"\} \+Inf$/m, 'gauge set to +Inf renders +Inf');
    like($body, qr/^t_g\{v="-inf"\} -Inf$/m, 'gauge set to -Inf renders -Inf');
};

subtest 'nothing else lost or added' => sub {
    is(metric_value($p, 't_ctl_total'), $sent, "control counter == $sent requests");
    is(scalar(metric_series($p, 't_two_total')), 0, 't_two_total: no series from the wrong calls');
    is(metric_value($p, 't_plain_total'), 0, 't_plain_total untouched');
    is(metric_value($p, 't_one_total', v => 'args'), 2, 'label values as arguments: counted');
    is(metric_value($p, 't_one_total', v => 'n'), undef, 'refused increments made no series');
    is(metric_value($p, 't_one_total', v => 'hd'), 0, 'refused handle increments left the series at 0');
    is(metric_value($p, 't_hist_seconds_count', v => 'h'), undef, 'refused observations made no series');
    is(metric_value($p, 't_hist_seconds_count', v => 'hd'), 0, 'refused handle observations left it at 0');
    is(metric_value($p, 't_g', v => 'g'), undef, 'refused gauge updates made no series');
    my @many = metric_series($p, 't_many_total');
    is(scalar @many, 10000, '/metrics has the 10k label sets');
    is(scalar(grep { $_->[1] != 1 } @many), 0, 'each at 1');
    is(metric_value($p, 'shmprom_series', family => 't_many_total'), 10000, 'shmprom_series{family="t_many_total"}');
    is(metric_sum($p, 'shmprom_series_dropped_total'), 0, 'nothing dropped');
    for my $k (sort keys %kinds0) {
        is(errs($p, $k) - $kinds0{$k}, $want_kind{$k} // 0, "shmprom_errors_total{kind=\"$k\"} grew by "
           . ($want_kind{$k} // 0));
    }
    for my $f (qw(t_d1_total t_d8_seconds 1bad bad-name)) {
        ok(!exists $p->{type}{$f}, "refused definition $f is not in the output");
    }
    is($p->{help}{t_one_total}, 'One label.', 'help text unchanged by the refused redefinition');
    is($p->{type}{t_one_total}, 'counter', 'kind unchanged');
};

my $om = $n->get('/metrics', Accept => 'application/openmetrics-text; version=1.0.0');
ok(eval { parse_metrics($om->{body})->{eof} }, 'OpenMetrics output parses too') or diag $@;

SKIP: {
    my ($dir) = grep { length && -x "$_/promtool" } split /:/, $ENV{PATH} // '';
    skip 'promtool not on PATH', 1 unless $dir;
    my ($fh, $file) = tempfile('shmprom-metrics-XXXXXX', TMPDIR => 1, UNLINK => 1);
    binmode $fh;
    print {$fh} $body;
    close $fh;
    my $out = `'$dir/promtool' check metrics < '$file' 2>&1`;
    is($?, 0, 'promtool check metrics passes') or diag substr($out, 0, 3000);
}

my $chk = call('/check'); $sent--;
like($chk, qr/^ok\b/, "consistency check: $chk");
is_deeply([ $n->worker_pids ], \@pids0, 'same worker pids before and after (no worker died)');
my @bad = $n->error_lines(ignore => qr/shmprom: t_\w+: |label values too long/);
is(scalar @bad, 0, 'no [error]/[crit]/[alert] lines but the rate-limited update errors')
    or diag join "\n", map { substr($_, 0, 300) } @bad[0 .. ($#bad < 20 ? $#bad : 19)];
ok($n->stop, 'nginx stops gracefully');
diag sprintf('074-hostile.t total %.1f s', time - $t_start);
done_testing;
