# grafana/lib.sh: sourced by validate.sh and live.sh (not run by itself).
#
# need_prometheus [1]: make sure promtool (and, with 1, the prometheus server)
# is installed: Debian's `prometheus` package, via apt-get when we are root. A
# policy-rc.d that denies service starts is put in place for the install, so
# the package's own daemon never starts (our checks start their own, on
# loopback, with temp storage).
need_prometheus() {
  if command -v promtool >/dev/null && { [ "${1:-0}" != 1 ] || command -v prometheus >/dev/null; }; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "promtool/prometheus missing: install Debian's 'prometheus' package (root needed)" >&2
    return 1
  fi
  echo "installing Debian package prometheus (promtool, prometheus); its service is not started" >&2
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
