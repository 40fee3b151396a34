#!/usr/bin/env bash
# validate.sh: check grafana/postern.json and grafana/alerts.yml; installs what it needs. CI calls it.
#
#   grafana/validate.sh          offline (no server started):
#                                  1. grafana/gen_dashboard.py --check: postern.json is what the generator writes
#                                  2. ../shared/tools/validate_dashboard.py: grafana-foundation-sdk typed round trip
#                                     (unknown/misplaced fields), uid/title/ids/gridPos, `promtool check rules` on every expr
#                                  3. grafana/check_spec.py: every metric of SPEC.md's and README.md's Metrics tables
#                                     charted, no unknown metric or label
#                                  4. promtool check rules grafana/alerts.yml
#   grafana/validate.sh --live   the above, then grafana/live.sh (a real Prometheus scraping a real postern that has
#                                seen traffic; every dashboard and alert expression through the HTTP API;
#                                promtool test rules grafana/alerts_test.yml)
#
# Needs: python3 (venv), PyPI grafana-foundation-sdk (pinned below, into $VENV), promtool (Debian package `prometheus`,
# installed with apt-get when missing and we are root; its daemon is not started). --live: see live.sh.
# Env: VENV (~/.cache/postern-grafana-venv) SHARED (../shared); for --live: POSTERN KEEP (see live.sh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=grafana/lib.sh
. "$HERE/lib.sh"
DASH=${DASH:-$HERE/postern.json}
SHARED=${SHARED:-$REPO/../shared}
VALIDATOR=$SHARED/tools/validate_dashboard.py
SPEC=$SHARED/SPEC.md
SDK_SPEC='grafana-foundation-sdk==1769699379!11.6.0'   # the SDK's models for Grafana 11.6 (schemaVersion 41)
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/postern-grafana-venv}
LIVE=0; [ "${1:-}" = "--live" ] && LIVE=1

log() { echo "[validate] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -f "$VALIDATOR" ] || die "no validator at $VALIDATOR (set SHARED=path/to/shared)"
[ -f "$SPEC" ] || die "no SPEC.md at $SPEC"

# ---------------------------------------------------------------- dependencies
if ! "$VENV/bin/python" -c 'import grafana_foundation_sdk' 2>/dev/null; then
  log "installing $SDK_SPEC into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$SDK_SPEC" >&2
fi
need_prometheus "$LIVE" || die "promtool is needed"

# ---------------------------------------------------------------- offline
rc=0
if [ "$DASH" = "$HERE/postern.json" ]; then
  log "gen_dashboard.py --check"
  python3 "$HERE/gen_dashboard.py" --check || rc=1
fi
log "validate_dashboard.py $DASH"
"$VENV/bin/python" "$VALIDATOR" "$DASH" || rc=1
log "check_spec.py $DASH $SPEC (+ README.md)"
python3 "$HERE/check_spec.py" "$DASH" "$SPEC" || rc=1
log "promtool check rules grafana/alerts.yml"
promtool check rules "$HERE/alerts.yml" >&2 || rc=1
[ "$LIVE" = 1 ] || exit $rc

# ---------------------------------------------------------------- live
log "live.sh"
bash "$HERE/live.sh" || rc=1
exit $rc
