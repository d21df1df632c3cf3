# Issue 7.3: a Lua wrapper paired with a library of another ABI version.
# The wrapper under test is lua/resty/shmprom.lua copied unchanged but for
# `ABI = N` -> `ABI = 999`, put first on lua_package_path. nginx must refuse
# to start with a clear "version mismatch" message (in the command's output
# and the error log), and leave nothing running: no master, no worker. The
# same config with the real wrapper then starts.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Path qw(make_path remove_tree);
use File::Temp qw(tempdir);
use Time::HiRes qw(time);
use ShmpromTest qw(wait_until repo_root);

my $LIB = repo_root() . '/target/release/libshmprom.so';
plan skip_all => "core library not built ($LIB missing; run make build)" unless -e $LIB;

my $t_start = time;

# ---------------------------------------------------------------- the odd wrapper
my $src = repo_root() . '/lua/resty/shmprom.lua';
open my $in, '<', $src or die "$src: $!";
my $code = do { local $/; <$in> };
close $in;
my ($abi) = $code =~ /^\s*ABI\s*=\s*(\d+)\s*,/m;
ok(defined $abi, "the wrapper declares its ABI (ABI = " . ($abi // '?') . ')') or BAIL_OUT('no ABI line in the wrapper');
(my $odd = $code) =~ s/^(\s*ABI\s*=\s*)\d+(\s*,)/${1}999$2/m;
isnt($odd, $code, 'copy with ABI = 999');

my $base = $ENV{TMPDIR} && -d $ENV{TMPDIR} ? $ENV{TMPDIR} : '/tmp';
my $luadir = tempdir('shmprom-abi-XXXXXX', DIR => $base, CLEANUP => !$ENV{SHMPROM_KEEP});
make_path("$luadir/resty");
open my $out, '>', "$luadir/resty/shmprom.lua" or die $!;
print {$out} $odd;
close $out;

my $init = <<'LUA';
        local shmprom = require "resty.shmprom"
        metrics = shmprom.new{ zone = "t072", size = "1m" }
        m_req = metrics:counter("t_requests_total", "Requests.")
LUA
my $server = <<'NGX';
        location = /metrics { content_by_lua_block { metrics:collect() } }
        location = /abi { content_by_lua_block { ngx.say(require("resty.shmprom").ABI) } }
NGX

# the harness prepends SHMPROM_LUA_PATH to lua_package_path when it writes the config
my $n = do {
    local $ENV{SHMPROM_LUA_PATH} = "$luadir/?.lua";
    ShmpromTest->new(workers => 2, init => $init, server => $server);
};
like(ShmpromTest::_slurp($n->conf_path), qr/lua_package_path\s+"\Q$luadir\E\/\?\.lua;/, 'the odd wrapper comes first on lua_package_path');

# processes running this test's config (master or workers), found by /proc
sub ours {
    my $conf = $n->conf_path;
    my @p;
    opendir my $dh, '/proc' or return ();
    for my $pid (grep { /^\d+$/ } readdir $dh) {
        next if $pid == $$;
        open my $fh, '<', "/proc/$pid/cmdline" or next;
        my $c = do { local $/; <$fh> } // '';
        close $fh;
        push @p, $pid if index($c, $conf) >= 0;
    }
    closedir $dh;
    return @p;
}

# ---------------------------------------------------------------- nginx -t
# The lua module does not run init_by_lua* under `nginx -t`, so a config
# test cannot see the mismatch; only the start can. Reported, not asserted.
{
    my ($ok, $outp) = $n->test_config;
    note 'nginx -t with the mismatched wrapper: ' . ($ok ? 'passes (init_by_lua does not run under -t)' : "fails:\n$outp");
}

# ---------------------------------------------------------------- start
my $mark = $n->log_mark;
my $t0 = time;
my $started = eval { $n->start(timeout => 10); 1 };
my $err = $@ // '';
my $took = time - $t0;
ok(!$started, sprintf('nginx refuses to start (%.2f s)', $took));
like($err, qr/nginx failed to start/, 'the start command itself failed (not a late crash)') or diag $err;
like($err, qr/version mismatch/, 'its output says "version mismatch"') or diag $err;

my $log = $n->error_log(since => $mark);
like($log, qr/version mismatch/, 'the error log says "version mismatch"') or diag $log;
my ($line) = grep { /version mismatch/ } split /\n/, $log;
$line //= '';
like($line, qr/ABI $abi\b/, 'the message names the library\'s ABI');
like($line, qr/needs ABI 999\b/, 'the message names the wrapper\'s ABI');
like($line, qr/\Q$LIB\E|libshmprom\.so/, 'the message names the library file');
like($line, qr/\[(?:emerg|error|alert)\]/, 'logged at error level or above');
diag "message: $line";

# nothing half-running
my $pidfile = $n->prefix . '/logs/nginx.pid';
my $pid = -e $pidfile ? do { open my $f, '<', $pidfile; local $/; <$f> } : undef;
ok(!defined $pid || !kill(0, $pid =~ /(\d+)/ ? $1 : 0), 'no master pid file (or its pid is gone)');
ok(!$n->is_running, 'harness sees no master');
my @left = ours();
is(scalar @left, 0, 'no nginx process with this config is left') or diag "left: @left";
my $probe = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $n->port, Proto => 'tcp', Timeout => 1);
ok(!$probe, 'nothing listens on the test port');
close $probe if $probe;

# ---------------------------------------------------------------- control: the real wrapper starts
{
    local $ENV{SHMPROM_LUA_PATH};
    delete $ENV{SHMPROM_LUA_PATH};
    $n->set_config;
}
my $up = eval { $n->start; 1 };
ok($up, 'the same config with the matching wrapper starts') or diag $@;
if ($up) {
    is($n->get('/abi')->{body}, "$abi\n", "ABI $abi wrapper loaded");
    is($n->get('/metrics')->{status}, 200, '/metrics answers');
    ok($n->stop, 'nginx stops');
}
is(scalar(ours()), 0, 'nothing left running at the end');

remove_tree($luadir) unless $ENV{SHMPROM_KEEP};
diag sprintf('072-version.t total %.1f s', time - $t_start);
done_testing;
