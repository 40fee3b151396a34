#!/usr/bin/env bash
# flag_lost_update.sh — runs flag_lost_update.py (two sessions of one login change flags of the
# same message; the later STORE must not wipe the earlier one's flag) against a real
# `postern serve` on a temp config (common.sh). Exit 1 if a flag is lost.
set -uo pipefail
MB_TAG=flag_lost_update
# shellcheck source=common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
trap mb_cleanup EXIT
trap 'exit 130' INT TERM
mb_start "alice:alice@local.test:user" pw
mb_hold 2 alice@local.test
timeout 60 python3 "$MB_HERE/flag_lost_update.py" "$MB_IMAP" alice pw
