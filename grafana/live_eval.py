#!/usr/bin/env python3
"""Run every dashboard and alert expression against a live Prometheus (HTTP API, stdlib only).

Why: PromQL that parses can still chart nothing (a misspelt label value, a
ratio whose halves never match, a metric the binary does not export). This
asks the Prometheus that grafana/live.sh started, after it scraped a gateway
that has seen traffic:

- every dashboard target expr (Grafana's `$__*` intervals -> 5m, other
  variables -> `.*`, as ../shared/tools/validate_dashboard.py substitutes) and
  every `label_values(metric, label)` template variable: must return >= 1 series;
- every alerting rule Prometheus loaded from alerts.yml (read back from
  /api/v1/rules, so Prometheus itself parsed the file): its health must be
  "ok" and its expr must run through /api/v1/query (an empty result is fine);
  the expected rule count guards against a file that silently loaded nothing.

Prints a table (kind, title, series) and exits 1 on any empty dashboard query
or any failing alert expression.

Usage: live_eval.py DASHBOARD.json PROM_URL [--after EPOCH] [--alerts N]
  --after EPOCH  first wait until Prometheus holds two scrapes of job "postern" newer than EPOCH
  --alerts N     the number of alerting rules alerts.yml defines (must all be loaded)
"""
import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request


def api(prom, path, **params):
    url = f"{prom}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:   # 400/422 carry a JSON error body
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def subst(e):
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", lambda m: "5m" if "__" in m.group(0) else ".*", e)


def panels(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", []) or []   # panels inside a collapsed row


def dashboard_queries(dash):
    """[(title, promql)] for every target and every label_values() variable."""
    out = []
    for p in panels(dash):
        for t in p.get("targets", []) or []:
            if t.get("expr"):
                ref = f" [{t.get('refId')}]" if len(p["targets"]) > 1 else ""
                out.append((f"{p.get('title')}{ref}", subst(t["expr"])))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$", q or "")
        if v.get("type") == "query" and m:
            out.append((f"variable ${v['name']}", f"count by ({m.group(2)}) ({subst(m.group(1))})"))
    return out


def wait_scrapes(prom, after, timeout=30):
    """Until the newest `up{job="postern"}` sample is over one interval past `after`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = api(prom, "query", query='timestamp(up{job="postern"})')
        res = r.get("data", {}).get("result", [])
        if res and float(res[0]["value"][1]) > after + 1.0:   # scrape_interval is 1s
            return True
        time.sleep(0.25)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dashboard")
    ap.add_argument("prom")
    ap.add_argument("--after", type=float)
    ap.add_argument("--alerts", type=int)
    a = ap.parse_args()
    errs, rows = [], []
    if a.after and not wait_scrapes(a.prom, a.after):
        errs.append("Prometheus did not scrape postern twice after the traffic within 30 s")

    dash = json.load(open(a.dashboard, encoding="utf-8"))
    for title, q in dashboard_queries(dash):
        r = api(a.prom, "query", query=q)
        if r.get("status") != "success":
            rows.append(("dashboard", title, "ERROR"))
            errs.append(f"dashboard {title!r}: {r.get('error')}: {q}")
            continue
        n = len(r["data"]["result"]) if r["data"]["resultType"] in ("vector", "matrix") else 1
        rows.append(("dashboard", title, str(n)))
        if n == 0:
            errs.append(f"dashboard {title!r}: no data: {q}")

    groups = api(a.prom, "rules", type="alert").get("data", {}).get("groups", [])
    alerts = [(g["name"], r) for g in groups for r in g["rules"]]
    for group, rule in alerts:
        r = api(a.prom, "query", query=rule["query"])
        title = f"{group}/{rule['name']}"
        if r.get("status") != "success" or rule.get("health") != "ok":
            rows.append(("alert", title, "ERROR"))
            errs.append(f"alert {title}: health={rule.get('health')} {rule.get('lastError', '')} {r.get('error', '')}")
            continue
        state = rule.get("state", "?")
        rows.append(("alert", title, f"{len(r['data']['result'])} ({state})"))
    if a.alerts is not None and len(alerts) != a.alerts:
        errs.append(f"Prometheus loaded {len(alerts)} alerting rules, alerts.yml has {a.alerts}")

    w = max(len(t) for _, t, _ in rows) if rows else 10
    print(f"{'kind':9} {'query (panel title / alert)':{w}} series")
    for kind, title, n in rows:
        print(f"{kind:9} {title:{w}} {n}")
    nd = sum(1 for k, _, _ in rows if k == "dashboard")
    ns = sum(int(n) for k, _, n in rows if k == "dashboard" and n.isdigit())
    print(f"{nd} dashboard queries ({ns} series), {len(alerts)} alert expressions, {len(errs)} problems")
    for e in errs:
        print("ERROR:", e)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
