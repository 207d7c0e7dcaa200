#!/bin/sh
# The power-cut guest's first steps (tests/vm/powercut_guest.py has the rest): under software
# emulation a Python start costs ~20 s and the tracer's ~50 s, so the tracer starts here, in
# the background, while the writer's Python starts.
#   sh tests/vm/powercut_guest.sh OUT LOOPNO SEED [LOGMODE]
set -eu
OUT=$1 LOOPNO=$2 SEED=$3 LOGMODE=${4:-buffered}
PY=$(dirname "$0")/../../.venv/bin/python
fail() { printf '{"error": "%s"}\n' "$*" > "$OUT/result.json"; exit 1; }
for m in virtio_blk loop ext4; do modprobe "$m" 2>/dev/null || true; done
disk() {  # the virtio disk whose serial is $1
    for i in $(seq 50); do
        for d in /sys/block/vd*; do
            [ -e "$d/serial" ] && [ "$(cat "$d/serial")" = "$1" ] && { echo "/dev/${d##*/}"; return; }
        done
        sleep 0.1
    done
    fail "no virtio disk with serial $1"
}
LOGDISK=$(disk pclog) DEVDISK=$(disk pcdev)
mkdir -p /tmp/powercut/logfs
mount -t ext4 "$LOGDISK" /tmp/powercut/logfs || fail "cannot mount the LOG disk $LOGDISK"
LOOP=/dev/loop$LOOPNO
[ -e "$LOOP" ] || mknod "$LOOP" b 7 "$LOOPNO"  # opening it creates the device (legacy autoload)
losetup --direct-io=on "$LOOP" "$DEVDISK" || fail "losetup $LOOP $DEVDISK failed"
LOG=/tmp/powercut/logfs/log
"$PY" -m blkrewind.cli trace --device "$LOOP" --log "$LOG" --ring-mb 32 --segment-mb 16 \
    --log-mode "$LOGMODE" 2> "$OUT/trace.stderr" &
exec "$PY" "$(dirname "$0")/powercut_guest.py" "$OUT" "$LOOP" "$LOG" "$SEED" $!
