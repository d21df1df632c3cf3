#!/usr/bin/perl
# Print every PromQL expression of a Grafana dashboard, with the dashboard's
# template variables replaced by values Prometheus accepts, so that each
# expression can be sent as is to /api/v1/query.
#
#   scripts/dashboard-exprs.pl [--json] [--var NAME=VALUE ...] [DASHBOARD.json]
#
# Default dashboard: nginx-conf/dashboards/dfs-gateway.json of this repo.
#
# Expressions come from the targets of every panel (rows included, also the
# panels inside collapsed rows) and from the query variables: for
# `label_values(SELECTOR, label)` the SELECTOR is printed.
#
# Substitutions (override any of them with --var):
#   $__rate_interval, $__interval   -> 1m
#   $__range                         -> 5m
#   $__range_s                       -> 300
#   $__interval_ms                   -> 60000
#   any other $name, ${name}, ${name:format}, [[name]]
#                                    -> the variable's allValue, else .*
#     (every variable of the dashboard is used inside =~ matchers, where
#      .* selects everything, like Grafana's "All")
#
# Output: one expression per line (newlines inside an expression become
# spaces), or with --json a JSON array of objects
#   {"panel": TITLE, "refId": ID, "expr": EXPR}      for panel targets
#   {"variable": NAME, "expr": SELECTOR}             for query variables
# Exit status 1 when the file cannot be read or holds no expression.

use strict;
use warnings;
use File::Basename qw(dirname);
use File::Spec;
use Getopt::Long qw(GetOptions);
use JSON::PP ();

my $json_out = 0;
my %override;
GetOptions('json' => \$json_out, 'var=s' => \%override)
    or die "usage: $0 [--json] [--var NAME=VALUE ...] [DASHBOARD.json]\n";

my $file = shift @ARGV
    // File::Spec->catfile(dirname(File::Spec->rel2abs($0)), File::Spec->updir,
                           qw(nginx-conf dashboards dfs-gateway.json));

open my $fh, '<:raw', $file or die "$file: $!\n";
my $text = do { local $/; <$fh> };
close $fh;
my $dash = JSON::PP->new->decode($text);

my %value = (
    __rate_interval => '1m',
    __interval      => '1m',
    __range         => '5m',
    __range_s       => '300',
    __interval_ms   => '60000',
);
for my $v (@{ $dash->{templating}{list} // [] }) {
    next unless defined $v->{name};
    $value{ $v->{name} } = defined $v->{allValue} && length $v->{allValue}
        ? $v->{allValue} : '.*';
}
%value = (%value, %override);

sub substitute {
    my ($expr) = @_;
    # ${name}, ${name:format}, [[name]], [[name:format]], $name
    $expr =~ s/ \$\{ (\w+) (?: :[^\}]* )? \}
              | \[\[ (\w+) (?: :[^\]]* )? \]\]
              | \$ (\w+)
              / my $name = $1 \/\/ $2 \/\/ $3;
                exists $value{$name} ? $value{$name} : '.*' /gex;
    $expr =~ s/\s+/ /g;
    $expr =~ s/^ | $//g;
    return $expr;
}

my @out;

sub walk {
    my ($panels) = @_;
    for my $p (@{ $panels // [] }) {
        for my $t (@{ $p->{targets} // [] }) {
            next unless defined $t->{expr} && $t->{expr} =~ /\S/;
            push @out, { panel => $p->{title} // '', refId => $t->{refId} // '',
                         expr => substitute($t->{expr}) };
        }
        walk($p->{panels});
    }
}
walk($dash->{panels});

for my $v (@{ $dash->{templating}{list} // [] }) {
    next unless ($v->{type} // '') eq 'query';
    my $q = ref $v->{query} eq 'HASH' ? $v->{query}{query} : $v->{query};
    next unless defined $q;
    # label_values(SELECTOR, label) or label_values(label): the selector part
    if ($q =~ /^\s*label_values\(\s*(.+)\s*,\s*\w+\s*\)\s*$/s) {
        push @out, { variable => $v->{name}, expr => substitute($1) };
    } elsif ($q =~ /^\s*query_result\(\s*(.+)\s*\)\s*$/s) {
        push @out, { variable => $v->{name}, expr => substitute($1) };
    }
}

die "$file: no PromQL expression found\n" unless @out;

if ($json_out) {
    print JSON::PP->new->canonical->pretty->encode(\@out);
} else {
    print "$_->{expr}\n" for @out;
}
