#!/usr/bin/env python3
"""Write grafana/postern.json, the Postern dashboard (stdlib only).

Why a generator: 40-odd panels share one datasource, one scrape-label filter
and a few query shapes; writing them out by hand is how a panel ends up with
the wrong selector or an overlapping gridPos. Edit the PANELS list below, run
`python3 grafana/gen_dashboard.py`, commit both files. `--check` exits 1 when
postern.json is not what this script writes (grafana/validate.sh runs it).

Query shapes: counters as `sum by (l) (rate(x[$__rate_interval]))` (rare events
as `increase`), gauges as `sum by (l) (x)`, shares as a ratio of two such sums,
histograms as `histogram_quantile(q, sum by (le) (rate(x_bucket[...])))`.
Every selector carries `job=~"$job", instance=~"$instance"`.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
F = 'job=~"$job", instance=~"$instance"'
RI = "[$__rate_interval]"


def sel(metric, extra=""):
    return f"{metric}{{{F}{', ' + extra if extra else ''}}}"


def rate(metric, extra="", by=None, fn="rate"):
    inner = f"{fn}({sel(metric, extra)}{RI})"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def gauge(metric, extra="", by=None, agg="sum"):
    return f"{agg} by ({by}) ({sel(metric, extra)})" if by else f"{agg}({sel(metric, extra)})"


def quantile(q, metric, by="le"):
    return f"histogram_quantile({q}, sum by ({by}) (rate({sel(metric + '_bucket')}{RI})))"


def div(a, b, match=""):
    """A share: a / b (with a vector-matching clause such as "on (method) group_left ")."""
    return f"{a} / {match}{b}"


OK = 'result="ok"'


def target(expr, legend="", ref="A"):
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend,
            "range": True, "editorMode": "code"}


# Each panel: (kind, title, description, [(expr, legend)], options). kind: row | stat | ts
# options: unit, w (width), h, thresholds [(color, value)], mappings, stack, max, text (stat textMode)
ROWS = [
    ("Overview", [
        ("stat", "Version", "postern_build_info: the version(s) running; two during a rolling upgrade.",
         [("count by (version) (" + sel("postern_build_info") + ")", "{{version}}")],
         {"w": 3, "text": "name", "unit": "none"}),
        ("stat", "Received /s", "postern_messages_received_total: messages answered 250 after DATA, all listeners.",
         [(rate("postern_messages_received_total"), "")], {"w": 3, "unit": "reqps"}),
        ("stat", "Delivery success", "Share of delivery attempts that succeeded (result=\"ok\" over all results).",
         [(div(rate("postern_delivery_attempts_total", OK), rate("postern_delivery_attempts_total")), "")],
         {"w": 3, "unit": "percentunit", "thresholds": [("red", None), ("orange", 0.9), ("green", 0.98)]}),
        ("stat", "Waiting for delivery", "postern_queue_messages, states queued and deferred (held mail waits for an admin).",
         [(gauge("postern_queue_messages", 'state=~"queued|deferred"'), "")],
         {"w": 3, "unit": "short", "thresholds": [("green", None), ("orange", 100), ("red", 1000)]}),
        ("stat", "Oldest in queue", "postern_queue_oldest_age_seconds: how long the oldest queued or deferred message has waited (0 = none).",
         [(gauge("postern_queue_oldest_age_seconds", agg="max"), "")],
         {"w": 3, "unit": "s", "thresholds": [("green", None), ("orange", 600), ("red", 3600)]}),
        ("stat", "In quarantine", "postern_quarantine_messages: held copies (one per recipient).",
         [(gauge("postern_quarantine_messages"), "")], {"w": 3, "unit": "short"}),
        ("stat", "SMTP TLS share", "Inbound SMTP sessions that completed TLS (STARTTLS or 465) over all SMTP connections.",
         [(div(rate("postern_smtp_tls_sessions_total"), rate("postern_smtp_connections_total")), "")],
         {"w": 3, "unit": "percentunit"}),
        ("stat", "Rate-limit backend", "postern_ratelimit_backend_up (lowest over the selected instances): 1 = answering.",
         [(gauge("postern_ratelimit_backend_up", agg="min"), "")],
         {"w": 3, "unit": "none", "thresholds": [("red", None), ("green", 1)],
          "mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                                      "1": {"text": "up", "color": "green", "index": 1}}}]}),
    ]),
    ("SMTP intake", [
        ("ts", "SMTP connections /s by listener", "rate(postern_smtp_connections_total) by listener (relay, submission, submissions).",
         [(rate("postern_smtp_connections_total", by="listener"), "{{listener}}")], {"w": 8, "unit": "cps"}),
        ("ts", "Active SMTP sessions by listener", "postern_smtp_sessions_active by listener.",
         [(gauge("postern_smtp_sessions_active", by="listener"), "{{listener}}")], {"w": 8, "unit": "short"}),
        ("ts", "Messages received /s by listener", "rate(postern_messages_received_total) by listener.",
         [(rate("postern_messages_received_total", by="listener"), "{{listener}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Verdicts /s by verdict and stage", "rate(postern_verdicts_total): what the gateway answered (accept, reject, tempfail, quarantine, discard) and at which stage (connect, mail, rcpt, data); relay refusals are rejects at rcpt.",
         [(rate("postern_verdicts_total", by="verdict, stage"), "{{verdict}} @ {{stage}}")], {"w": 12, "unit": "reqps"}),
        ("ts", "TLS share by listener", "postern_smtp_tls_sessions_total over postern_smtp_connections_total, per listener (465 is always TLS).",
         [(div(rate("postern_smtp_tls_sessions_total", by="listener"), rate("postern_smtp_connections_total", by="listener")), "{{listener}}")],
         {"w": 12, "unit": "percentunit", "max": 1}),
    ]),
    ("Checks, limits and scanners", [
        ("ts", "SPF / DKIM / DMARC result shares", "Each result's share of its method's results (postern_auth_results_total); trusted networks and authenticated users are not checked.",
         [(div(rate("postern_auth_results_total", by="method, result"), rate("postern_auth_results_total", by="method"), "on (method) group_left "), "{{method}} {{result}}")],
         {"w": 12, "unit": "percentunit", "max": 1}),
        ("ts", "SPF / DKIM / DMARC results /s", "rate(postern_auth_results_total) by method and result.",
         [(rate("postern_auth_results_total", by="method, result"), "{{method}} {{result}}")], {"w": 12, "unit": "reqps"}),
        ("ts", "Rate-limited /s by limit", "rate(postern_ratelimited_total): transactions a limit of ratelimits.toml refused (450 4.7.1) or held; held ones show in \"Queue by state\".",
         [(rate("postern_ratelimited_total", by="limit"), "{{limit}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Rate-limit backend up", "postern_ratelimit_backend_up per instance: 1 while the limiter's backend answers (in-process: always; Redis in cluster mode).",
         [(gauge("postern_ratelimit_backend_up", by="instance", agg="min"), "{{instance}}")], {"w": 8, "unit": "none", "max": 1}),
        ("ts", "Scanner results /s", "rate(postern_scan_results_total) by scanner (clamd, rspamd) and result (clean, infected, spam, error).",
         [(rate("postern_scan_results_total", by="scanner, result"), "{{scanner}} {{result}}")], {"w": 8, "unit": "reqps"}),
    ]),
    ("Rules", [
        ("ts", "Top scripts by hits /s", "The 10 scripts that returned a verdict most often (postern_rule_verdicts_total without verdict=\"none\").",
         [("topk(10, " + rate("postern_rule_verdicts_total", 'verdict!="none"', by="script") + ")", "{{script}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Top scripts by time (s/s)", "The 10 scripts that used the most time: rate(postern_rule_seconds_sum), i.e. seconds of script time per second (1 = one core).",
         [("topk(10, " + rate("postern_rule_seconds_sum", by="script") + ")", "{{script}}")], {"w": 8, "unit": "s"}),
        ("ts", "Rule verdicts /s by verdict", "rate(postern_rule_verdicts_total) by verdict (none = the script let the next decide) and shadow (true = a .shadow.rhai script: counted, not applied).",
         [(rate("postern_rule_verdicts_total", by="verdict, shadow"), "{{verdict}} shadow={{shadow}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Rule errors /s by script", "rate(postern_rule_errors_total): throws, runaway scripts; the message took [rules] on_error.",
         [(rate("postern_rule_errors_total", by="script"), "{{script}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Rule time p50 / p99", "histogram_quantile over rate(postern_rule_seconds_bucket): time of one call of one script.",
         [(quantile(0.5, "postern_rule_seconds"), "p50"), (quantile(0.99, "postern_rule_seconds"), "p99")], {"w": 8, "unit": "s"}),
        ("ts", "Config reloads by result", "increase(postern_config_reloads_total): SIGHUP and file-change reloads; an error keeps the running rules and policies.",
         [(rate("postern_config_reloads_total", by="result", fn="increase"), "{{result}}")], {"w": 8, "unit": "short"}),
    ]),
    ("Queue and delivery", [
        ("ts", "Queue by state", "postern_queue_messages by state (queued, deferred, held).",
         [(gauge("postern_queue_messages", by="state"), "{{state}}")], {"w": 8, "unit": "short"}),
        ("ts", "Oldest message in queue", "postern_queue_oldest_age_seconds per instance: age of the oldest queued or deferred message.",
         [(gauge("postern_queue_oldest_age_seconds", by="instance", agg="max"), "{{instance}}")], {"w": 8, "unit": "s"}),
        ("ts", "Delivery attempts /s by result", "rate(postern_delivery_attempts_total): one per recipient group and attempt; ok, tempfail (retried), permfail (bounced).",
         [(rate("postern_delivery_attempts_total", by="result"), "{{result}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Delivery success share", "Share of delivery attempts with result=\"ok\", per instance.",
         [(div(rate("postern_delivery_attempts_total", OK, by="instance"), rate("postern_delivery_attempts_total", by="instance")), "{{instance}}")],
         {"w": 8, "unit": "percentunit", "max": 1}),
        ("ts", "Delivery time p50 / p90 / p99", "histogram_quantile over rate(postern_delivery_seconds_bucket): one attempt to the next hop.",
         [(quantile(0.5, "postern_delivery_seconds"), "p50"), (quantile(0.9, "postern_delivery_seconds"), "p90"),
          (quantile(0.99, "postern_delivery_seconds"), "p99")], {"w": 8, "unit": "s"}),
        ("ts", "Bounces (DSN) /s", "rate(postern_bounces_total): DSNs made for permanent failures and expired messages.",
         [(rate("postern_bounces_total"), "bounces")], {"w": 8, "unit": "reqps"}),
        ("ts", "Bounces dropped /s by reason", "rate(postern_dsn_suppressed_total): DSNs not sent because they would be backscatter (auth_failed: SPF or DMARC failed; outside_sender: mail from outside to a sender outside our domains).",
         [(rate("postern_dsn_suppressed_total", by="reason"), "{{reason}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Recipient verification /s", "rate(postern_recipient_verify_total) by result (ok, unknown = 550 5.1.1 at RCPT, tempfail = 451 4.4.3) and cached ([relay] verify_recipients).",
         [(rate("postern_recipient_verify_total", by="result, cached"), "{{result}} cached={{cached}}")], {"w": 8, "unit": "reqps"}),
        ("ts", "Delivery TLS share", "Share of delivery attempts whose session used STARTTLS (postern_delivery_attempts_total tls=\"yes\"), per instance; [outbound_tls] and MTA-STS decide.",
         [(div(rate("postern_delivery_attempts_total", 'tls="yes"', by="instance"), rate("postern_delivery_attempts_total", by="instance")), "{{instance}}")],
         {"w": 8, "unit": "percentunit", "max": 1}),
    ]),
    ("Quarantine", [
        ("ts", "Quarantine held", "postern_quarantine_messages: held copies, one per recipient.",
         [(gauge("postern_quarantine_messages"), "held")], {"w": 8, "unit": "short"}),
        ("ts", "Releases by way", "increase(postern_releases_total) by via: IMAP move to Release, POP3, digest web page, `postern quarantine release`.",
         [(rate("postern_releases_total", by="via", fn="increase"), "{{via}}")], {"w": 8, "unit": "short"}),
        ("ts", "Digests sent", "increase(postern_digests_sent_total): quarantine digest mails.",
         [(rate("postern_digests_sent_total", fn="increase"), "digests")], {"w": 8, "unit": "short"}),
        ("ts", "Mailbox logins /s by protocol and result", "rate(postern_mailbox_logins_total): POP3, IMAP and SMTP AUTH logins, ok and failed.",
         [(rate("postern_mailbox_logins_total", by="protocol, result"), "{{protocol}} {{result}}")], {"w": 12, "unit": "reqps"}),
        ("ts", "Mailbox login failure share", "Failed logins over all logins, per protocol (a password-guessing run shows here).",
         [(div(rate("postern_mailbox_logins_total", 'result="fail"', by="protocol"), rate("postern_mailbox_logins_total", by="protocol")), "{{protocol}}")],
         {"w": 12, "unit": "percentunit", "max": 1}),
    ]),
]


def thresholds(steps):
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def stat(pid, title, desc, targets, o, x, y):
    d = {"unit": o.get("unit", "short"), "color": {"mode": "thresholds"},
         "thresholds": thresholds(o.get("thresholds", [("green", None)]))}
    if "mappings" in o:
        d["mappings"] = o["mappings"]
    return {
        "type": "stat", "id": pid, "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": o.get("h", 4), "w": o["w"], "x": x, "y": y},
        "targets": [target(e, l, chr(65 + i)) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {"defaults": d, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "none" if o.get("text") == "name" else "area",
                    "justifyMode": "auto", "orientation": "auto", "textMode": o.get("text", "auto")},
    }


def timeseries(pid, title, desc, targets, o, x, y):
    d = {"unit": o.get("unit", "short"), "min": 0,
         "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                    "spanNulls": False, "stacking": {"mode": "none", "group": "A"}},
         "color": {"mode": "palette-classic"}}
    if "max" in o:
        d["max"] = o["max"]
    return {
        "type": "timeseries", "id": pid, "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": o.get("h", 8), "w": o["w"], "x": x, "y": y},
        "targets": [target(e, l, chr(65 + i)) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {"defaults": d, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def variable(name, query):
    return {
        "type": "query", "name": name, "label": name, "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
        "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "hide": 0, "regex": "", "skipUrlSync": False,
    }


def build():
    panels, pid, y = [], 1, 0
    for row_title, items in ROWS:
        panels.append({"type": "row", "id": pid, "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x, line_h = pid + 1, y + 1, 0, 0
        for kind, title, desc, targets, o in items:
            h = o.get("h", 4 if kind == "stat" else 8)
            if x + o["w"] > 24:
                x, y, line_h = 0, y + line_h, 0
            make = stat if kind == "stat" else timeseries
            panels.append(make(pid, title, desc, targets, o, x, y))
            pid, x, line_h = pid + 1, x + o["w"], max(line_h, h)
        y += line_h
    return {
        "uid": "postern-gateway",
        "title": "Postern",
        "description": "Postern mail gateway: SMTP intake, checks, rules, queue, delivery and quarantine (every metric in SPEC.md and README.md).",
        "tags": ["postern", "mail", "smtp"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "fiscalYearStartMonth": 0,
        "refresh": "30s", "schemaVersion": 41, "version": 2,
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
             "current": {}, "options": [], "refresh": 1, "regex": "", "hide": 0, "skipUrlSync": False,
             "multi": False, "includeAll": False},
            variable("job", "label_values(postern_build_info, job)"),
            variable("instance", 'label_values(postern_build_info{job=~"$job"}, instance)'),
        ]},
        "panels": panels,
    }


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "postern.json")
    text = json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
    if "--check" in sys.argv[1:]:
        cur = open(out, encoding="utf-8").read() if os.path.exists(out) else ""
        if cur != text:
            print(f"{out} is not what gen_dashboard.py writes: run python3 grafana/gen_dashboard.py")
            return 1
        print(f"{out}: as gen_dashboard.py writes it")
        return 0
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    d = json.loads(text)
    n = sum(len(p.get("targets", [])) for p in d["panels"])
    kinds = [p["type"] for p in d["panels"]]
    print(f"wrote {out}: {len(kinds)} panels ({kinds.count('row')} rows, {kinds.count('stat')} stats, "
          f"{kinds.count('timeseries')} time series), {n} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
