#!/usr/bin/env perl
# bench/gw-ab.pl: the gateway preset at two revisions and the gateway without
# metrics, side by side in one run (a diagnostic beside (b), not part of
# run-all.sh; it writes nothing into the repository).
#
#   perl bench/gw-ab.pl [BASE_REV]      (default BASE_REV: HEAD~1)
#   SECS=8 ROUNDS=7 perl bench/gw-ab.pl f5d8cae
#
# scripts/run-gateway.sh starts the storage nodes (and a gateway that is not
# measured); then three more gateways in front of the same nodes, each with 2
# workers, rendered from nginx-conf/gateway.conf the way run-gateway.sh does:
#   nm    the working tree's config with the two metric lines removed
#         (set_by_lua gateway.begin(), log_by_lua gateway.log());
#   base  lua/ and nginx-conf/gateway.conf as they are at BASE_REV;
#   new   lua/ and nginx-conf/gateway.conf of the working tree.
# All load target/release/libshmprom.so of the working tree. wrk GETs a
# 1 KiB file through one gateway at a time (-t2 -c50, SECS seconds), the
# order rotated every round; per round the req/s ratio config / nm and the
# CPU ratio nm CPU/req / config CPU/req (worker utime+stime over the run);
# medians over the rounds. The machine is shared: read the ranges too.
# Both sides record with the preset's Lua phase handlers (never the nginx
# module): for comparing Lua revisions; (b) compares the module.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Bench qw($REPO $WORK free_ports nginx_start nginx_stop http_get wrk_run median minmax
             slurp spew logmsg);

my $BASE = $ARGV[0] // 'HEAD~1';
my $SECS = $ENV{SECS} || 8;
my $ROUNDS = $ENV{ROUNDS} || 5;
my $USER = $> == 0 ? 'user root;' : '';

# BASE_REV's lua/ and template, from git
my $bdir = "$WORK/base-rev";
mkdir $bdir;
system("cd $REPO && git archive --format=tar '$BASE' lua nginx-conf/gateway.conf | tar -x -C $bdir") == 0
    or die "git archive $BASE failed\n";
my $strip = sub {
    my $n = s/^\s*(?:set_by_lua_block \$dfs_gateway_begun \{ return gateway\.begin\(\) \}|access_by_lua_block \{ gateway\.begin\(\) \}|log_by_lua_block \{ gateway\.log\(\) \})\s*\n//mg;
    die "expected to remove 2 metric lines, removed $n\n" unless $n == 2;
};
my @V = (
    { name => 'nm', tpl => "$REPO/nginx-conf/gateway.conf", lua => "$REPO/lua", edit => $strip },
    { name => 'base', tpl => "$bdir/nginx-conf/gateway.conf", lua => "$bdir/lua", edit => sub { } },
    { name => 'new', tpl => "$REPO/nginx-conf/gateway.conf", lua => "$REPO/lua", edit => sub { } },
);

my ($gwa, $meta, @nodes) = free_ports(5);
my $var = "$WORK/var";
my $envs = "GATEWAY_PORT='$gwa' METRICS_PORT='$meta' NODE_PORTS='@nodes' VAR_DIR='$var'";
system("cd $REPO && env $envs scripts/run-gateway.sh start >$WORK/start.log 2>&1") == 0
    or die slurp("$WORK/start.log");
my $stop_gw = sub { system("cd $REPO && env $envs scripts/run-gateway.sh stop >>$WORK/start.log 2>&1") };
my @ng;
eval {
    my $rendered = slurp("$var/conf/gateway.conf");
    my $servers = join '', grep { /^\s*server 127\.0\.0\.1:\d+/ } split /^/, $rendered;
    my ($luanodes) = $rendered =~ /nodes = \{ (.*?) \},/;
    spew("$var/data/bench-1k.bin", 'x' x 1024);
    my (%url, %w);
    for my $v (@V) {
        my ($p, $mp) = free_ports(2);
        my $pre = "$WORK/$v->{name}";
        mkdir $pre; mkdir "$pre/gateway"; mkdir "$pre/logs";
        my $t = slurp($v->{tpl});
        $t =~ s{\@REPO\@/lua/}{$v->{lua}/}g;
        $t =~ s/\@REPO\@/$REPO/g;
        $t =~ s/\@VAR_DIR\@/$pre/g;
        $t =~ s/\@GATEWAY_PORT\@/$p/g;
        $t =~ s/\@METRICS_PORT\@/$mp/g;
        $t =~ s/^\s*\@UPSTREAM_SERVERS\@\s*\n/$servers/m;
        $t =~ s/\@LUA_NODES\@/$luanodes/g;
        $t =~ s/\@USER_DIRECTIVE\@/$USER/g;
        # templates since the nginx module: both compared here are the
        # preset's Lua phase handlers
        $t =~ s/\@LOAD_SHMPROM_MODULE\@/# no ngx_http_shmprom_module/g;
        $t =~ s/^(\s*)\@GATEWAY_RECORDER\@\s*\n/$1set_by_lua_block \$dfs_gateway_begun { return gateway.begin() }\n$1log_by_lua_block { gateway.log() }\n/m;
        $v->{edit}->() for $t;
        my $n = nginx_start(name => "ng-$v->{name}", conf => $t,
                            ready => "http://127.0.0.1:$mp/metrics", workers => 2);
        push @ng, $n;
        $url{ $v->{name} } = "http://127.0.0.1:$p/bench-1k.bin";
        $w{ $v->{name} } = $n->{workers};
        my ($code, undef, $size) = http_get($url{ $v->{name} }, 5);
        die "$v->{name}: GET answers $code ($size bytes)\n" unless $code eq '200' && $size == 1024;
        wrk_run(url => $url{ $v->{name} }, threads => 2, conns => 50, secs => 2);
    }
    my %runs;
    my @names = map { $_->{name} } @V;
    for my $r (0 .. $ROUNDS - 1) {
        my @o = @names;
        push @o, shift @o for 1 .. ($r % @o);
        @o = reverse @o if $r % 2;
        for my $c (@o) {
            my $res = wrk_run(url => $url{$c}, threads => 2, conns => 50, secs => $SECS,
                              latency => 1, workers => $w{$c});
            logmsg sprintf('round %d %-5s %8.0f req/s %6.2f us CPU/req, errors %d', $r + 1, $c,
                           $res->{rps}, $res->{cpu_us_per_req}, $res->{errors} + $res->{non2xx});
            $runs{$c}[$r] = $res;
        }
    }
    print "gw-ab: base = $BASE, $ROUNDS rounds of ${SECS}s, wrk -t2 -c50\n";
    for my $c (@names) {
        my @rr = map { $runs{$c}[$_]{rps} / $runs{nm}[$_]{rps} } 0 .. $ROUNDS - 1;
        my @cr = map { $runs{nm}[$_]{cpu_us_per_req} / $runs{$c}[$_]{cpu_us_per_req} } 0 .. $ROUNDS - 1;
        printf "%-5s req/s %7.0f  CPU/req %5.2f us | vs nm: req/s %.3f (%.3f .. %.3f)  CPU %.3f (%.3f .. %.3f)\n",
            $c, median(map { $_->{rps} } @{ $runs{$c} }),
            median(map { $_->{cpu_us_per_req} } @{ $runs{$c} }),
            median(@rr), minmax(@rr), median(@cr), minmax(@cr);
    }
};
my $err = $@;
nginx_stop($_) for @ng;
$stop_gw->();
die $err if $err;
