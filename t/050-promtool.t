#!/usr/bin/perl
# The monitoring configuration in nginx-conf/ checked by the tools that will
# load it: promtool (Prometheus config, rules, rule unit tests) and amtool
# (Alertmanager config and routing). Each check is skipped, with the reason,
# when its tool is not installed (Debian: prometheus, prometheus-alertmanager).
use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use File::Spec;
use POSIX ();

my $ROOT = File::Spec->rel2abs(File::Spec->catdir(dirname(__FILE__), File::Spec->updir));
my $CONF = "$ROOT/nginx-conf";

sub which {
    my ($prog) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$prog" if -x "$d/$prog";
    }
    return;
}

# Runs a command, returns (exit status, combined output).
sub run {
    my @cmd = @_;
    my $pid = open(my $fh, '-|') // die "fork: $!";
    if (!$pid) {
        open STDERR, '>&', \*STDOUT;
        exec @cmd or POSIX::_exit(127);
    }
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return ($? >> 8, $out);
}

sub run_ok {
    my ($name, @cmd) = @_;
    my ($rc, $out) = run(@cmd);
    is $rc, 0, $name or diag "@cmd\n$out";
    return $out;
}

sub slurp { open my $f, '<', $_[0] or die "$_[0]: $!"; local $/; return scalar <$f> }

my @rules = glob "$CONF/rules/*.rules.yml";
my @rule_tests = glob "$CONF/rules/tests/*.yml";
ok scalar @rules, 'rule files present';
ok scalar @rule_tests, 'rule test files present';

# ---- promtool -------------------------------------------------------------------
SKIP: {
    my $promtool = which('promtool');
    skip 'promtool not installed (Debian package prometheus)', 5 unless $promtool;

    my $out = run_ok('promtool check config nginx-conf/prometheus.yml',
                     $promtool, 'check', 'config', "$CONF/prometheus.yml");
    # the config's rule_files glob must reach the rules
    like $out, qr/dfs_gateway\.rules\.yml/, 'prometheus.yml loads the rules';
    like $out, qr/SUCCESS: \d+ rules found/, 'and finds rules in them';

    run_ok('promtool check rules', $promtool, 'check', 'rules', @rules);
    run_ok('promtool test rules', $promtool, 'test', 'rules', @rule_tests);
}

# ---- coverage of the rule tests (plain text scan: no YAML module in core Perl) --
{
    my $rules = join '', map { slurp($_) } @rules;
    my $tests = join '', map { slurp($_) } @rule_tests;
    my @alerts = $rules =~ /^\s*-\s*alert:\s*(\S+)/mg;
    my @records = $rules =~ /^\s*-\s*record:\s*(\S+)/mg;
    ok scalar @alerts >= 7, scalar(@alerts) . ' alerts defined';
    for my $a (qw(DfsGatewayDown DfsGatewayHighErrorRatio DfsGatewayHighLatency
                  DfsStorageNodeDown DfsStorageNodeFailing ShmpromZoneNearlyFull
                  ShmpromMetricsDropped)) {
        ok((grep { $_ eq $a } @alerts), "alert $a defined");
    }
    for my $a (@alerts) {
        # a test that expects it to fire (an exp_alerts list with entries)
        # and one that expects silence (exp_alerts: [])
        my @blocks = $tests =~ /alertname:\s*\Q$a\E\s*\n\s*exp_alerts:(\s*\[\]|\s*\n\s*-)/g;
        ok((grep { /\[\]/ } @blocks), "alert $a: a test expects it quiet");
        ok((grep { /-/ } @blocks), "alert $a: a test expects it firing");
    }
    for my $r (@records) {
        like $tests, qr/expr:[^\n]*\b\Q$r\E\b/, "recording rule $r: its value is tested";
    }
    # every alert has a severity and both annotations
    my @alert_blocks = split /^\s*-\s*alert:/m, $rules;
    shift @alert_blocks;
    for my $b (@alert_blocks) {
        my ($name) = $b =~ /^\s*(\S+)/;
        like $b, qr/^\s*severity:\s*(?:critical|warning)\s*$/m, "$name: severity label";
        like $b, qr/^\s*summary:/m, "$name: summary";
        like $b, qr/^\s*description:/m, "$name: description";
    }
}

# ---- amtool -----------------------------------------------------------------------
SKIP: {
    my $amtool = which('amtool');
    skip 'amtool not installed (Debian package prometheus-alertmanager)', 7 unless $amtool;
    my $am = "$CONF/alertmanager.yml";
    run_ok('amtool check-config nginx-conf/alertmanager.yml', $amtool, 'check-config', $am);

    my @routes = (
        [ 'ops-critical', 'alertname=DfsGatewayDown', 'severity=critical', 'instance=gw1:9145' ],
        [ 'ops-critical', 'alertname=DfsStorageNodeDown', 'severity=critical', 'node=10.0.0.1:8081' ],
        [ 'ops-warning',  'alertname=DfsStorageNodeFailing', 'severity=warning', 'node=10.0.0.1:8081' ],
        [ 'ops-warning',  'alertname=ShmpromZoneNearlyFull', 'severity=warning', 'instance=gw1:9145' ],
        [ 'ops-warning',  'alertname=SomethingElse' ],
    );
    for my $r (@routes) {
        my ($receiver, @labels) = @$r;
        my ($rc, $out) = run($amtool, 'config', 'routes', 'test', "--config.file=$am",
                             "--verify.receivers=$receiver", @labels);
        is $rc, 0, "@labels -> $receiver" or diag $out;
    }
    my $conf = slurp($am);
    like $conf, qr/source_matchers:\s*\n\s*-\s*alertname="DfsStorageNodeDown"\s*\n\s*target_matchers:\s*\n\s*-\s*alertname="DfsStorageNodeFailing"\s*\n\s*equal:\s*\[node\]/,
        'DfsStorageNodeDown inhibits DfsStorageNodeFailing of the same node';
}

done_testing;
