#!/bin/sh
# Provision one lab VM: install blkrewind from /opt/blkrewind, then run the replayer or a tracer
# as the systemd units in systemd/ (the same files a production host uses).
# Certificates: made once on the host running `vagrant up` (vagrant/README.md) in vagrant/.lab/tls.
set -eu
NAME=$1
REPLAYER_IP=$2
cd /opt/blkrewind
./bootstrap.sh setup
install -d -m 700 /etc/blkrewind
[ -d "/lab/tls/$NAME" ] || { echo "missing /lab/tls/$NAME: run 'blkrewind tls init vagrant/.lab/tls --hosts replayer=$REPLAYER_IP,web1,web2' first" >&2; exit 1; }
rm -rf /etc/blkrewind/tls && cp -rp "/lab/tls/$NAME" /etc/blkrewind/tls
chmod 600 /etc/blkrewind/tls/key.pem
if [ "$NAME" = replayer ]; then
    cat > /etc/blkrewind/serve.env <<EOT
STORE=/var/lib/blkrewind/store
LISTEN=0.0.0.0:7420
TLS=/etc/blkrewind/tls
SERVE_OPTS=
EOT
    install -m 644 systemd/blkrewind-serve.service /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable --now blkrewind-serve
else
    DEV=/dev/vdb; [ -b "$DEV" ] || DEV=/dev/sdb
    [ -b "$DEV" ] || { echo "no data disk (/dev/vdb or /dev/sdb)" >&2; exit 1; }
    if ! blkid "$DEV" >/dev/null 2>&1; then
        mkfs.ext4 -q "$DEV"
    fi
    install -d /srv/data
    grep -q "^$DEV " /etc/fstab || echo "$DEV /srv/data ext4 defaults 0 2" >> /etc/fstab
    mount -a
    cat > /etc/blkrewind/trace-data.env <<EOT
DEVICES=$DEV
LOG=/var/lib/blkrewind/log
SHIP=$REPLAYER_IP:7420
TLS=/etc/blkrewind/tls
TRACE_OPTS=--log-max-mb 1024
EOT
    install -m 644 systemd/blkrewind-trace@.service /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable --now blkrewind-trace@data
fi
