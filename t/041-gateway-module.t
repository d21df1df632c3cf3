#!/usr/bin/perl
# t/040-gateway.t again, with ngx_http_shmprom_module recording the
# gateway's requests (RECORDER=module: load_module and "shmprom_gateway on"
# instead of the preset's Lua phase handlers): the same clients, the same
# exact expectations (operations, statuses, bytes, object sizes, per-node
# attempts, failures and retries, requests in flight).
use strict;
use warnings;
use FindBin;

$ENV{SHMPROM_T040_RECORDER} = 'module';
my $t = "$FindBin::Bin/040-gateway.t";
my $rc = do $t;
die "$t: $@" if $@;
die "$t: $!" unless defined $rc;
