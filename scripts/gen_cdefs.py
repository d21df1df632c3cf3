#!/usr/bin/env python3
"""Regenerates lua/resty/shmprom/cdefs.lua from include/shmprom.h."""
import os
import re
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
header = open(os.path.join(root, "include", "shmprom.h")).read()
body = header.split("/* SHMPROM_CDEF_BEGIN */\n")[1].split("/* SHMPROM_CDEF_END */")[0]
path = os.path.join(root, "lua", "resty", "shmprom", "cdefs.lua")
lua = open(path).read()
new = re.sub(r"_M\.text = \[\[\n.*?\]\]", lambda m: "_M.text = [[\n" + body + "]]", lua, flags=re.S)
if new != lua:
    open(path, "w").write(new)
    print("updated", path)
sys.exit(0)
