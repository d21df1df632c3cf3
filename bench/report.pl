#!/usr/bin/env perl
# bench/report.pl OUT_DIR RESULTS.md: assembles bench/RESULTS.md from the
# fragments the benchmarks wrote (OUT_DIR/[a-f].md, targets.tsv, status),
# the machine description, and, for every target missed in this run, the
# diagnosis kept in bench/diagnosis.md (a section per target key).

use strict;
use warnings;
use FindBin;
use POSIX qw(strftime);

my ($out, $results) = @ARGV;
die "usage: report.pl OUT_DIR RESULTS.md\n" unless $out && $results;
my $repo = "$FindBin::Bin/..";

sub slurp {
    my ($p) = @_;
    open my $fh, '<', $p or return undef;
    local $/;
    my $c = <$fh>;
    close $fh;
    return $c;
}
sub cmd { my $o = `$_[0] 2>&1`; $o //= ''; chomp $o; $o }

my ($cpu) = (slurp('/proc/cpuinfo') // '') =~ /^model name\s*:\s*(.+)$/m;
my ($mem) = (slurp('/proc/meminfo') // '') =~ /^MemTotal:\s*(\d+)/m;
my $nginx = cmd('nginx -v');
$nginx =~ s/^nginx version: nginx\///;
my $luamod = cmd("dpkg-query -W -f='\${Version}' libnginx-mod-http-lua");
my $luajit = slurp("$out/luajit.txt") // "not measured (bench (a) did not run)\n";
chomp $luajit;
my $luajit_pkg = cmd("dpkg-query -W -f='\${Version}' libluajit2-5.1-2");
my ($wrk) = cmd('wrk -v') =~ /^(wrk \S+)/m;
# the state when the run started (run-all.sh), else now
my $commit = slurp("$out/git.head") // cmd("git -C $repo rev-parse --short HEAD");
chomp $commit;
my @dirty = grep { /\S/ } split /\n/, (slurp("$out/git.dirty")
    // cmd("git -C $repo status --porcelain -- src lua Cargo.toml include"));
my $lib = "$repo/target/release/libshmprom.so";
my $libsum = (split ' ', cmd("sha256sum $lib"))[0] // '?';
my $libsum0 = slurp("$out/lib.sha256") // '';
$libsum0 = (split ' ', $libsum0)[0] // '';
my $libtime = -e $lib ? strftime('%Y-%m-%d %H:%M:%S UTC', gmtime((stat $lib)[9])) : '?';
my $quick = $ENV{QUICK} ? 'QUICK=1 (short runs: debugging figures, not the reference)' : 'full';
my $peer = $ENV{PEER_LUA_PATH} || '';
my $peer_rev = '';
if ($peer) {
    my $c = cmd("git -C $peer rev-parse --short HEAD");
    if ($c =~ /^[0-9a-f]+$/) {
        $peer_rev = "commit $c";
    } elsif (my ($rs) = glob("$peer/*.rockspec")) {
        ($peer_rev = $rs) =~ s{.*/|\.rockspec$}{}g;
    }
}
my $total = slurp("$out/total_secs") // '?';
chomp $total;
my @load = (split ' ', slurp('/proc/loadavg') // '')[0 .. 2];

my $md = "# shmprom benchmarks: results\n\n";
$md .= "Written by `make bench` (bench/run-all.sh) on "
     . strftime('%Y-%m-%d %H:%M UTC', gmtime) . "; mode: $quick; total run time "
     . sprintf('%.1f', $total / 60) . " min. Benchmarks, not tests: no timing is asserted "
     . "anywhere in `make test`. This 2-core machine is shared with other engineers' test runs, "
     . "so every figure below is set against a baseline measured in the same run, with the "
     . "compared configurations alternating run by run and medians of several runs.\n\n";
$md .= "## Machine and software\n\n";
$md .= "- CPU: " . cmd('nproc') . " cores (nproc), " . ($cpu // '?') . "\n";
$md .= sprintf("- memory: %.1f GiB; kernel %s; load average after the run %s\n",
               ($mem // 0) / 1048576, cmd('uname -r'), join(' ', @load));
$md .= "- nginx $nginx (Debian), lua module $luamod, $luajit (package libluajit2 $luajit_pkg)\n";
$md .= "- " . ($wrk // 'wrk ?') . ", curl, perl " . sprintf('%vd', $^V) . "\n";
$md .= "- shmprom at commit $commit" . (@dirty ? ' with uncommitted changes in ' . join(', ', map { (split ' ', $_)[-1] } @dirty) : '')
     . " when the run started; target/release/libshmprom.so sha256 "
     . substr($libsum0 || $libsum, 0, 16) . ". The benchmarks load copies of the library and "
     . "of lua/ taken at the start"
     . ($libsum0 && $libsum0 ne $libsum
        ? "; the repository's library was rebuilt during the run (now sha256 " . substr($libsum, 0, 16)
          . ", built $libtime), which only the gateway of (b) (started by scripts/run-gateway.sh "
          . "from the repository) may have loaded"
        : '') . "\n";
$md .= "- peer: " . ($peer ? "nginx-lua-prometheus from PEER_LUA_PATH" . ($peer_rev ? " ($peer_rev)" : '')
                           : "not run (PEER_LUA_PATH unset): peer figures are quoted from "
                             . "../shared/docs/anchors.md and labelled so") . "\n\n";

# summary against the targets
my @t;
for my $l (split /\n/, slurp("$out/targets.tsv") // '') {
    my @f = split /\t/, $l;
    push @t, \@f if @f >= 5;
}
$md .= "## Summary against the issue's targets\n\n";
if (@t) {
    $md .= "| what | target | measured (against its baseline of the same run) | verdict |\n|---|---|---|---|\n";
    for my $f (@t) {
        # a row with no target (a sizing figure beside one) is not a miss
        my $v = $f->[4] =~ /^(?:met|sizing figure)/ ? $f->[4] : "**$f->[4]**";
        $md .= "| $f->[1] | $f->[2] | $f->[3] | $v |\n";
    }
    $md .= "\n";
} else {
    $md .= "No target was measured in this run.\n\n";
}
for my $l (split /\n/, slurp("$out/status") // '') {
    my ($b, $rc, $secs) = split ' ', $l;
    $md .= "Benchmark ($b) FAILED (exit $rc); its log tail is in its section below.\n\n" if $rc;
}

# diagnosis of the missed ones
my $diag = slurp("$FindBin::Bin/diagnosis.md") // '';
my %sec;
while ($diag =~ /^### (\S+)\n(.*?)(?=^### |\z)/msg) {
    $sec{$1} = $2;
}
my @missed = grep { $_->[4] !~ /^(?:met|sizing figure)/ } @t;
if (@missed) {
    $md .= "## Where a target is missed: by how much, why, and what would close it\n\n";
    my %done;
    for my $f (@missed) {
        my $key = $f->[0];
        my ($k) = grep { $key eq $_ || $key =~ /^\Q$_\E/ } sort { length $b <=> length $a } keys %sec;
        $md .= "### $f->[1]: $f->[4]\n\n";
        $md .= "Target $f->[2]; measured $f->[3].\n\n";
        if ($k && !$done{$k}++) {
            (my $s = $sec{$k}) =~ s/\s+\z/\n\n/;
            $s =~ s/\A\s+//;
            $md .= $s;
        } elsif ($k) {
            $md .= "Same cause as above.\n\n";
        } else {
            $md .= "(no diagnosis written for `$key` in bench/diagnosis.md)\n\n";
        }
    }
}

for my $b (qw(a b c d e f)) {
    my $frag = slurp("$out/$b.md");
    $md .= $frag if defined $frag;
}
$md .= "## Running them\n\n"
     . "`make bench` (= `bench/run-all.sh`, about 18 minutes, 23 with the peer) rewrites this file; `QUICK=1 make bench` "
     . "takes about 2 minutes; `BENCH_ONLY=\"a c\"` picks benchmarks; `PEER_LUA_PATH=/path/to/"
     . "nginx-lua-prometheus` runs the peer side by side in every benchmark (its code is never copied "
     . "into this repository). Each benchmark is a Perl script under bench/ (helpers in "
     . "bench/lib/Bench.pm, Lua in bench/lua/shmprom_bench/, wrk script in bench/wrk/); nginx "
     . "instances run from throw-away prefixes on free 127.0.0.1 ports and are stopped by pid.\n";

# Sections written by other commands or by hand ("## Full zone", bench/soak.pl's "## Soak", the
# valgrind run's "## Valgrind", "## Gateway module by hand", "## Checks by hand") are kept from
# the previous file.
if (defined(my $prev = slurp($results))) {
    for my $sec ('Full zone', 'Soak', 'Valgrind', 'Gateway module by hand', 'Checks by hand') {
        if ($prev =~ /^(## \Q$sec\E\n.*?)(?=^## |\z)/ms) {
            my $section = $1;
            $md .= "\n" unless $md =~ /\n\n\z/;
            $md .= $section;
        }
    }
}

open my $fh, '>', "$results.tmp" or die "$results.tmp: $!\n";
print {$fh} $md;
close $fh or die "$results.tmp: $!\n";
rename "$results.tmp", $results or die "rename $results: $!\n";
