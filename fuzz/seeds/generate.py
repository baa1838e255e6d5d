#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs from the hostile-input corpus and a few typed values.

Each seed starts with the option byte its target reads first. The workbook bombs larger than a
few kilobytes are left out: the fuzzer repeats seeds often, and their point is made by the tests.

    python3 fuzz/seeds/generate.py
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
BAD = os.path.join(HERE, "..", "..", "tests", "fixtures", "bad")


def put(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


for name in sorted(os.listdir(BAD)):
    path = os.path.join(BAD, name)
    size = os.path.getsize(path)
    if size > 64 * 1024 or name.endswith(".py"):
        continue
    data = open(path, "rb").read()
    if name.endswith(".csv"):
        put("csv_reader", name, b"\x00" + data)
        put("csv_reader", name + ".1252", b"\x04" + data)
    kinds = {".xlsx": 0, ".ods": 1, ".xls": 2, ".xlsb": 3}
    ext = os.path.splitext(name)[1]
    if ext in kinds:
        put("excel_reader", name, bytes([kinds[ext]]) + data)

CELLS = [
    "12", "-0", "1e308", "NaN", "12.50", "79228162514264337593543950336", "yes", "N", "t",
    "2024-02-29", "1900-02-29", "9999-12-31", "02/30/1975", "2024-03-10 02:30:00",
    "2024-11-03 01:30:00", "2024-03-01T08:30:00+05:45", "1709281800", "12/31/9999 23:59",
    "2024-03-01T08:30:00.123456789-1200", "   ", "NA", "",
]
put("ingest", "cells", b"\x01" + b"\x1f".join(c.encode() for c in CELLS))
put("ingest", "apia", b"\x02" + "2011-12-30 12:00:00\x1f2011-12-29 23:59:59".encode())

for i, (kind, v, w) in enumerate([
    (0, b"2024-03-01", b"Observation"),
    (0, b"2024-03-10T02:30:00", b"America/Chicago"),
    (3, b"12.50", b"<"),
    (0, b"M", b""),
    (0, b"HGB", b""),
    (2, b"\x00\x00\x00\x00\x00\x00\xf8\x7f", b"mg/dL"),
    (1, b"\xff\xff\xff\xff\xff\xff\xff\x7f", b">="),
]):
    for which in range(12):
        put("template_filters", f"seed-{i}-{which}", bytes([kind, which]) + v + b"\x1f" + w)
