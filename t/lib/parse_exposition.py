#!/usr/bin/env python3
"""Parses an exposition with Python's prometheus_client (an independent
parser) and prints one line per sample: canonical key, tab, value.

usage: parse_exposition.py text|openmetrics FILE
The key is name{a="x",b="y"} with labels sorted and values escaped, the
same form as t/lib/ShmpromTest.pm's parse_metrics.
"""
import math
import sys


def esc(v):
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def main():
    fmt, path = sys.argv[1], sys.argv[2]
    text = open(path, encoding="utf-8").read()
    if fmt == "openmetrics":
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    n = 0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{esc(v)}"' for k, v in sorted(s.labels.items()))
            key = s.name + ("{" + labels + "}" if labels else "")
            v = s.value
            if math.isnan(v):
                out = "NaN"
            elif math.isinf(v):
                out = "+Inf" if v > 0 else "-Inf"
            else:
                out = repr(float(v))
            print(f"{key}\t{out}\t{fam.type}")
            n += 1
    print(f"# {n} samples", file=sys.stderr)


main()
