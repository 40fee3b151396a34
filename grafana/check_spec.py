#!/usr/bin/env python3
"""Cross-check grafana/postern.json against SPEC.md's Metrics table (stdlib only).

- every metric SPEC.md lists that the gateway exports is charted (a histogram
  through its _bucket series); SPEC metrics that no code registers yet (the
  open issues add them) are listed as notes, and become errors once the code
  exports them uncharted;
- every postern_* name the dashboard queries is one SPEC.md lists (catches typos
  that PromQL syntax checks cannot see);
- every label a query groups or filters a postern_* metric by is one SPEC.md gives
  that metric (plus `le` for histograms, and the scrape labels job/instance).

Usage: check_spec.py DASHBOARD.json SPEC.md [SRC_DIR]   Exit 0 when clean, 1 otherwise.
SRC_DIR (default: ../src beside this script) is where exported names are looked up.
"""
import json
import os
import re
import sys

SCRAPE_LABELS = {"job", "instance"}


def spec_metrics(path):
    """{name: (type, {labels})} from the table rows: | `name` | type | `l1`, `l2` |"""
    out = {}
    row = re.compile(r"^\|\s*`(postern_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|(.*)\|\s*$")
    for line in open(path, encoding="utf-8"):
        m = row.match(line.strip())
        if m:
            labels = set(re.findall(r"`([a-z_]+)`", m.group(3)))
            out[m.group(1)] = (m.group(2), labels)
    return out


def exported(src_dir):
    """Metric names the code registers: every "postern_..." string literal in src/."""
    names = set()
    for root, _, files in os.walk(src_dir):
        for f in files:
            if f.endswith(".rs"):
                text = open(os.path.join(root, f), encoding="utf-8").read()
                names.update(re.findall(r'"(postern_[a-z0-9_]+)"', text))
    return names


def exprs(dash):
    for p in dash.get("panels", []):
        for t in p.get("targets", []) or []:
            if t.get("expr"):
                yield p.get("title"), t["expr"]


def main(dash_path, spec_path, src_dir):
    spec = spec_metrics(spec_path)
    code = exported(src_dir)
    if not spec:
        print(f"ERROR: no metrics table found in {spec_path}")
        return 1
    dash = json.load(open(dash_path, encoding="utf-8"))
    errs, charted = [], set()
    for title, e in exprs(dash):
        names = re.findall(r"\b(postern_[a-z0-9_]+)", e)
        for n in names:
            base = re.sub(r"_(bucket|sum|count)$", "", n) if n not in spec else n
            if base not in spec:
                errs.append(f"panel {title!r}: {n} is not in SPEC.md's Metrics table")
                continue
            charted.add(base)
            kind, labels = spec[base]
            allowed = labels | SCRAPE_LABELS | ({"le"} if kind == "histogram" else set())
            # labels in selectors: name{a="x", b=~"y"}
            for sel in re.findall(re.escape(n) + r"\{([^}]*)\}", e):
                for lab in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", sel):
                    if lab not in allowed:
                        errs.append(f"panel {title!r}: {base} has no label {lab!r} in SPEC.md")
        # labels in grouping: by (a, b) — checked against every metric in the expression
        for grp in re.findall(r"\bby\s*\(([^)]*)\)", e):
            for lab in [x.strip() for x in grp.split(",") if x.strip()]:
                ok = any(
                    lab in spec[b][1] | SCRAPE_LABELS | ({"le"} if spec[b][0] == "histogram" else set())
                    for b in (re.sub(r"_(bucket|sum|count)$", "", n) for n in names)
                    if b in spec
                )
                if not ok:
                    errs.append(f"panel {title!r}: grouping label {lab!r} is not a SPEC.md label of {', '.join(names)}")
    for name in sorted(set(spec) - charted):
        if name in code:
            errs.append(f"{name} (SPEC.md Metrics table) is exported but not charted")
        else:
            print(f"NOTE: {name} (SPEC.md Metrics table) is not exported yet; an open issue adds it")
    for e in errs:
        print("ERROR:", e)
    print(f"{dash_path}: {len(spec)} SPEC metrics, {len(charted)} charted, {len(errs)} problems")
    return 1 if errs else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        print(__doc__)
        sys.exit(2)
    here = os.path.dirname(os.path.abspath(__file__))
    src = sys.argv[3] if len(sys.argv) == 4 else os.path.join(here, "..", "src")
    sys.exit(main(sys.argv[1], sys.argv[2], src))
