#!/usr/bin/env python3
"""Cross-check grafana/postern.json against the Metrics tables of SPEC.md and README.md (stdlib only).

The metric contract is SPEC.md's table plus the extensions README.md's
"## Metrics and dashboard" table documents (same row format; a label there may
be followed by a parenthesised list of its values). Per metric the labels of
both tables are merged; a type that differs between them is an error.

- every listed metric that the gateway exports is charted (a histogram
  through its _bucket or _sum series); a metric that no code registers yet (an
  open issue adds it) is listed as a note, and becomes an error once the code
  exports it uncharted;
- every postern_* name the dashboard queries is listed (catches typos that
  PromQL syntax checks cannot see);
- every label a query groups or filters a postern_* metric by is one the
  tables give that metric (plus `le` for histograms, and the scrape labels
  job/instance).

Usage: check_spec.py DASHBOARD.json SPEC.md [SRC_DIR] [--readme README.md]   Exit 0 when clean, 1 otherwise.
SRC_DIR (default: ../src beside this script) is where exported names are looked up;
README.md defaults to ../README.md beside this script.
"""
import json
import os
import re
import sys

SCRAPE_LABELS = {"job", "instance"}


def strip_parens(text):
    """Drop parenthesised value lists, innermost first: `stage` (connect, mail (= MAIL FROM)) -> `stage`."""
    while True:
        t = re.sub(r"\([^()]*\)", "", text)
        if t == text:
            return t
        text = t


def spec_metrics(path):
    """{name: (type, {labels})} from the table rows: | `name` | type | `l1` (values), `l2` |"""
    out = {}
    row = re.compile(r"^\|\s*`(postern_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|(.*)\|\s*$")
    for line in open(path, encoding="utf-8"):
        m = row.match(line.strip())
        if m:
            labels = set(re.findall(r"`([a-z_]+)`", strip_parens(m.group(3))))
            out[m.group(1)] = (m.group(2), labels)
    return out


def merged(tables):
    """One {name: (type, labels)} from several tables; [errors] where their types differ."""
    out, errs = {}, []
    for path, table in tables:
        for name, (kind, labels) in table.items():
            if name in out and out[name][0] != kind:
                errs.append(f"{name} is a {out[name][0]} in one table and a {kind} in {path}")
            kind0, labels0 = out.get(name, (kind, set()))
            out[name] = (kind0, labels0 | labels)
    return out, errs


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


def main(dash_path, spec_path, src_dir, readme_path):
    tables = [(spec_path, spec_metrics(spec_path))]
    if readme_path and os.path.exists(readme_path):
        tables.append((readme_path, spec_metrics(readme_path)))
    spec, errs = merged(tables)
    code = exported(src_dir)
    if not tables[0][1]:
        print(f"ERROR: no metrics table found in {spec_path}")
        return 1
    dash = json.load(open(dash_path, encoding="utf-8"))
    charted = set()
    for title, e in exprs(dash):
        names = re.findall(r"\b(postern_[a-z0-9_]+)", e)
        for n in names:
            base = re.sub(r"_(bucket|sum|count)$", "", n) if n not in spec else n
            if base not in spec:
                errs.append(f"panel {title!r}: {n} is in neither Metrics table (SPEC.md, README.md)")
                continue
            charted.add(base)
            kind, labels = spec[base]
            allowed = labels | SCRAPE_LABELS | ({"le"} if kind == "histogram" else set())
            # labels in selectors: name{a="x", b=~"y"}
            for sel in re.findall(re.escape(n) + r"\{([^}]*)\}", e):
                for lab in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", sel):
                    if lab not in allowed:
                        errs.append(f"panel {title!r}: {base} has no label {lab!r} in the Metrics tables")
        # labels in grouping: by (a, b) — checked against every metric in the expression
        for grp in re.findall(r"\bby\s*\(([^)]*)\)", e):
            for lab in [x.strip() for x in grp.split(",") if x.strip()]:
                ok = any(
                    lab in spec[b][1] | SCRAPE_LABELS | ({"le"} if spec[b][0] == "histogram" else set())
                    for b in (re.sub(r"_(bucket|sum|count)$", "", n) for n in names)
                    if b in spec
                )
                if not ok:
                    errs.append(f"panel {title!r}: grouping label {lab!r} is not a Metrics-table label of {', '.join(names)}")
    for name in sorted(set(spec) - charted):
        if name in code:
            errs.append(f"{name} (Metrics table) is exported but not charted")
        else:
            print(f"NOTE: {name} (Metrics table) is not exported yet; an open issue adds it")
    for e in errs:
        print("ERROR:", e)
    print(f"{dash_path}: {len(spec)} metrics in {len(tables)} table(s), {len(charted)} charted, {len(errs)} problems")
    return 1 if errs else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    here = os.path.dirname(os.path.abspath(__file__))
    readme = os.path.join(here, "..", "README.md")
    if "--readme" in args:
        i = args.index("--readme")
        readme = args[i + 1] if i + 1 < len(args) else ""
        del args[i:i + 2]
    if len(args) not in (2, 3) or not readme:
        print(__doc__)
        sys.exit(2)
    src = args[2] if len(args) == 3 else os.path.join(here, "..", "src")
    sys.exit(main(args[0], args[1], src, readme))
