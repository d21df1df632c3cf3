#!/usr/bin/perl
# The Grafana dashboard nginx-conf/dashboards/dfs-gateway.json: importable
# as is (data source input, variables), every panel has a data source and
# queries, the panels cover what the gateway exports, and the expression
# extractor scripts/dashboard-exprs.pl prints every query with the variables
# substituted, in a form promtool accepts as PromQL. Running the queries
# against a real Prometheus is t/060-prometheus.t.
use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use File::Spec;
use File::Temp qw(tempdir);
use JSON::PP ();
use POSIX ();

my $ROOT = File::Spec->rel2abs(File::Spec->catdir(dirname(__FILE__), File::Spec->updir));
my $FILE = "$ROOT/nginx-conf/dashboards/dfs-gateway.json";
my $EXTRACT = "$ROOT/scripts/dashboard-exprs.pl";

sub slurp { open my $f, '<:raw', $_[0] or die "$_[0]: $!"; local $/; return scalar <$f> }

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

my $text = slurp($FILE);
my $d = eval { JSON::PP->new->decode($text) };
ok $d, 'the dashboard is valid JSON' or do { diag "cannot parse $FILE: $@"; done_testing; exit 1 };

# ---- importable as is ----------------------------------------------------------
my ($input) = grep { ($_->{name} // '') eq 'DS_PROMETHEUS' } @{ $d->{__inputs} // [] };
ok $input, '__inputs has DS_PROMETHEUS';
is $input->{type}, 'datasource', 'DS_PROMETHEUS is a data source input';
is $input->{pluginId}, 'prometheus', 'of the Prometheus plugin';
like $text, qr/"\$\{DS_PROMETHEUS\}"/, 'the input is used';
ok !defined $d->{id}, 'no database id (import creates one)';
ok length($d->{uid} // '') && length($d->{uid}) <= 40, 'a stable uid';
ok $d->{title}, 'a title';
ok $d->{schemaVersion}, 'a schema version';

my %var = map { $_->{name} => $_ } @{ $d->{templating}{list} // [] };
is $var{datasource}{type}, 'datasource', 'variable datasource';
is $var{datasource}{query}, 'prometheus', 'lists Prometheus data sources';
for my $v (qw(instance node)) {
    ok $var{$v}, "variable $v";
    is $var{$v}{type}, 'query', "$v is a query variable";
    is $var{$v}{datasource}{uid}, '${datasource}', "$v queries the selected data source";
    ok $var{$v}{includeAll} && $var{$v}{multi}, "$v: multi-value with All";
    is $var{$v}{allValue}, '.*', "$v: All is .*";
}

# ---- panels ---------------------------------------------------------------------
my (@panels, %ids);
sub walk {
    my ($list, $in_row) = @_;
    for my $p (@$list) {
        ok !$ids{ $p->{id} // 'undef' }++, "panel id " . ($p->{id} // 'undef') . " unique";
        if (($p->{type} // '') eq 'row') {
            walk($p->{panels} // [], $p);
        } else {
            push @panels, $p;
        }
    }
}
walk($d->{panels} // []);
ok @panels >= 10, scalar(@panels) . ' panels';

my @exprs;
for my $p (@panels) {
    my $t = $p->{title} // '';
    ok length $t, "panel $p->{id} has a title";
    like $p->{datasource}{uid} // '', qr/^\$\{(?:datasource|DS_PROMETHEUS)\}$/,
        "$t: data source";
    my @targets = @{ $p->{targets} // [] };
    ok @targets >= 1, "$t: at least one target";
    my %ref;
    for my $q (@targets) {
        ok length($q->{expr} // ''), "$t/$q->{refId}: has an expression";
        ok !$ref{ $q->{refId} // '' }++, "$t/$q->{refId}: refId unique";
        like $q->{datasource}{uid} // '${datasource}', qr/^\$\{(?:datasource|DS_PROMETHEUS)\}$/,
            "$t/$q->{refId}: target data source";
        push @exprs, $q->{expr};
        my $e = $q->{expr};
        if ($e =~ /\b(?:dfs_gateway_|shmprom_)/) {
            like $e, qr/instance=~"\$instance"/, "$t/$q->{refId}: follows \$instance";
        }
        if ($e =~ /\bdfs_gateway_(?:node_|upstream_)/) {
            like $e, qr/node=~"\$node"/, "$t/$q->{refId}: follows \$node";
        }
        if ($e =~ /\b(?:rate|increase)\(/) {
            like $e, qr/\[\$__rate_interval\]/, "$t/$q->{refId}: rates over \$__rate_interval";
        }
    }
    my $g = $p->{gridPos} // {};
    ok $g->{w} && $g->{h} && $g->{x} + $g->{w} <= 24, "$t: grid position";
}

# no two panels overlap (rows and the panels of a collapsed row laid out apart)
{
    my @boxes;
    my $overlap = 0;
    sub boxes {
        my ($list, $out) = @_;
        for my $p (@$list) {
            push @$out, $p;
            boxes($p->{panels}, $out) if ($p->{type} // '') eq 'row' && $p->{collapsed};
        }
    }
    boxes($d->{panels}, \@boxes);
    for my $i (0 .. $#boxes) {
        for my $j ($i + 1 .. $#boxes) {
            my ($a, $b) = map { $_->{gridPos} } @boxes[$i, $j];
            next if $a->{x} + $a->{w} <= $b->{x} || $b->{x} + $b->{w} <= $a->{x};
            next if $a->{y} + $a->{h} <= $b->{y} || $b->{y} + $b->{h} <= $a->{y};
            $overlap++;
            diag "overlap: $boxes[$i]{title} / $boxes[$j]{title}";
        }
    }
    is $overlap, 0, 'no overlapping panels';
}

# every metric of the gateway preset and the self-metrics an operator watches
my $all = join "\n", @exprs;
for my $m (qw(dfs_gateway_requests_total dfs_gateway_request_duration_seconds_bucket
              dfs_gateway_received_bytes_total dfs_gateway_sent_bytes_total
              dfs_gateway_object_size_bytes_bucket dfs_gateway_requests_in_flight
              dfs_gateway_upstream_attempts_total dfs_gateway_upstream_failures_total
              dfs_gateway_upstream_retries_total dfs_gateway_upstream_duration_seconds_bucket
              dfs_gateway_node_up dfs_gateway_node_probe_duration_seconds
              dfs_gateway_connections shmprom_zone_bytes shmprom_zone_fill_ratio shmprom_series
              shmprom_series_capacity shmprom_series_dropped_total shmprom_errors_total
              up)) {
    like $all, qr/\b\Q$m\E\{/, "some panel queries $m";
}
like $all, qr/histogram_quantile\(0\.5,\s*sum by \(op, le\)/, 'p50 by op';
like $all, qr/histogram_quantile\(0\.99,\s*sum by \(op, le\)/, 'p99 by op';
like $all, qr/status=~"5\.\."/, '5xx';

# ---- the extractor ----------------------------------------------------------------
my $n_vars = grep { ($_->{type} // '') eq 'query' } @{ $d->{templating}{list} };
{
    my ($rc, $out) = run($^X, $EXTRACT, $FILE);
    is $rc, 0, 'dashboard-exprs.pl runs';
    my @lines = split /\n/, $out;
    is scalar @lines, @exprs + $n_vars, 'one line per target and per query variable';
    is scalar(grep { /\$/ } @lines), 0, 'no variable left unsubstituted';
    ok scalar(grep { /\[1m\]/ } @lines), '$__rate_interval -> 1m';
    ok scalar(grep { /instance=~"\.\*"/ } @lines), '$instance -> .*';
    ok scalar(grep { /node=~"\.\*"/ } @lines), '$node -> .*';

    ($rc, $out) = run($^X, $EXTRACT, '--json', '--var', '__rate_interval=30s', $FILE);
    is $rc, 0, 'dashboard-exprs.pl --json runs';
    my $list = eval { JSON::PP->new->decode($out) } // [];
    is scalar @$list, @exprs + $n_vars, '--json: one entry per expression';
    ok !(grep { !($_->{panel} // $_->{variable}) } @$list), '--json: each names its panel or variable';
    ok scalar(grep { $_->{expr} =~ /\[30s\]/ } @$list), '--var overrides a substitution';

    # the whole set is valid PromQL: promtool parses it as recording rules
    SKIP: {
        my ($promtool) = grep { -x } map { "$_/promtool" } split /:/, $ENV{PATH} // '';
        skip 'promtool not installed', 1 unless $promtool;
        my $dir = tempdir(CLEANUP => 1);
        open my $f, '>', "$dir/exprs.yml" or die $!;
        print $f "groups:\n  - name: dashboard\n    rules:\n";
        my $i = 0;
        for my $e (@lines) {
            (my $q = $e) =~ s/'/''/g;
            printf $f "      - record: dashboard:expr_%d\n        expr: '%s'\n", $i++, $q;
        }
        close $f;
        my ($rc2, $out2) = run($promtool, 'check', 'rules', "$dir/exprs.yml");
        is $rc2, 0, 'every dashboard expression parses as PromQL (promtool)' or diag $out2;
    }
}

done_testing;
