#!/usr/bin/env bash
# login_rss.sh — postern's resident memory after bursts of concurrent IMAP LOGINs (argon2id,
# m=19 MiB per verification). For each K in BURSTS ("1 5 20 40") a fresh postern (common.sh
# temp config, 10 users) gets ROUNDS (5) bursts of K simultaneous LOGINs; RSS is printed after
# each burst. Then the same with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576 (a fixed
# mmap threshold: freed argon2 blocks go back to the kernel) for comparison.
set -uo pipefail
MB_TAG=login_rss
# shellcheck source=common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
BURSTS=${BURSTS:-"1 5 20 40"}
ROUNDS=${ROUNDS:-5}
SPEC=""
for i in 01 02 03 04 05 06 07 08 09 10; do SPEC+="u$i:u$i@local.test:user "; done
one() {   # one K [env...] : a fresh postern in a subshell, bursts, stop
  local k=$1; shift
  ( trap mb_cleanup EXIT; trap 'exit 130' INT TERM
    export "$@"
    mb_start "$SPEC" pw 2>/dev/null
    timeout 300 python3 "$MB_HERE/login_rss.py" "$MB_IMAP" "$MB_POSTERN_PID" "$k" "$ROUNDS" u pw )
}
rc=0
echo "glibc malloc defaults:"
for k in $BURSTS; do one "$k" MB_DUMMY=1 || rc=1; done
echo "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576:"
for k in $BURSTS; do one "$k" GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576 || rc=1; done
exit $rc
