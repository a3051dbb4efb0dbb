#!/bin/bash
# Install the CBAS master as a systemd service, as root:
#   scripts/install-master.sh SETTINGS_FILE [WHEEL_OR_SOURCE]
# makes a `cbas` system user (home /var/lib/cbas), a venv in /opt/cbas with CBAS from the wheel
# (default: this checkout), the settings in /etc/cbas/master.env (mode 0640, group cbas), and
# the unit scripts/cbas-master.service; then enables and starts it. Run it again to upgrade.
# With CBAS_INSTALL_ROOT=DIR it installs into DIR instead of / (an image being built): the unit is
# enabled there and nothing is started.
set -euo pipefail
settings=${1:?usage: install-master.sh SETTINGS_FILE [WHEEL_OR_SOURCE]}
here=$(cd "$(dirname "$0")" && pwd -P)
package=${2:-$(dirname "$here")}
root=${CBAS_INSTALL_ROOT:-/}
root=${root%/}
[ -r "$settings" ] || { echo "install-master.sh: cannot read $settings" >&2; exit 2; }
if [ -z "$root" ] && ! id -u cbas >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/cbas --create-home --shell /usr/sbin/nologin cbas
fi
install -d -m 0755 "$root/opt/cbas" "$root/etc/cbas" "$root/etc/systemd/system"
install -d -m 0750 "$root/var/lib/cbas"
[ -x "$root/opt/cbas/venv/bin/python" ] || python3 -m venv "$root/opt/cbas/venv"
"$root/opt/cbas/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$package"
install -m 0640 "$settings" "$root/etc/cbas/master.env"
install -m 0644 "$here/cbas-master.service" "$root/etc/systemd/system/cbas-master.service"
if [ -z "$root" ]; then
  chown cbas:cbas /var/lib/cbas
  chgrp cbas /etc/cbas/master.env
  systemctl daemon-reload
  systemctl enable cbas-master
  systemctl restart cbas-master  # started, or after an upgrade restarted: its jobs go on meanwhile
  echo "cbas-master is running; its log: journalctl -u cbas-master -f"
else
  systemctl --root="$root" enable cbas-master 2>/dev/null
  echo "installed into $root; cbas-master starts at its boot"
fi
