#!/usr/bin/env bash
# Build the artefacts needed to boot the Debian kernel's v9fs client in QEMU.
#
#   tests/vm/build.sh CACHE_DIR
#
# Produces CACHE_DIR/vmlinux (uncompressed ELF kernel, booted by QEMU via PVH)
# and CACHE_DIR/base.cpio.gz (busybox + 9p/virtio-net modules + /init).
# Idempotent: returns at once when both exist and were made by this version of
# the script. Nothing is installed except the host tools (qemu, cpio, xz).
set -euo pipefail
export LC_ALL=C

CACHE=${1:?usage: build.sh CACHE_DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
STAMP=$(sha256sum "$HERE/build.sh" | cut -c1-16)

is_built() {
    command -v qemu-system-x86_64 >/dev/null &&
        [[ -s $CACHE/vmlinux && -s $CACHE/base.cpio.gz && -f $CACHE/stamp ]] &&
        [[ $(<"$CACHE/stamp") == "$STAMP" ]]
}
is_built && exit 0

# Serialise concurrent builds (e.g. parallel test workers).
exec 9>"$CACHE/.lock"
flock 9
is_built && exit 0

log() { echo "build.sh: $*" >&2; }

# --- host tools -------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi

# --- download and unpack packages -------------------------------------------
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
KPKG=$(kernel_pkg || true)
if [[ -z $KPKG ]]; then apt-get update >&2; KPKG=$(kernel_pkg); fi
[[ -n $KPKG ]] || { log "cannot resolve linux-image-amd64"; exit 1; }

DEBS=$CACHE/debs
mkdir -p "$DEBS"
fetch() {  # fetch PKG: download PKG's .deb into $DEBS unless present
    compgen -G "$DEBS/${1}_*.deb" >/dev/null && return 0
    log "downloading $1"
    (cd "$DEBS" && { apt-get download "$1" >&2 || { apt-get update >&2 && apt-get download "$1" >&2; }; })
}
fetch "$KPKG"
fetch busybox-static

WORK=$CACHE/work
rm -rf "$WORK"
mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/root"
dpkg-deb -x "$(ls "$DEBS/${KPKG}"_*.deb | tail -1)" "$WORK/kernel"
dpkg-deb -x "$(ls "$DEBS"/busybox-static_*.deb | tail -1)" "$WORK/busybox"

# --- vmlinux from vmlinuz ---------------------------------------------------
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
is_elf() { [[ $(head -c4 "$1" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }
extract() {  # extract MAGIC_REGEX DECOMPRESSOR...: try every offset of the magic
    local magic=$1 off; shift
    for off in $(grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1); do
        tail -c +$((off + 1)) "$VMLINUZ" | "$@" >"$WORK/vmlinux" 2>/dev/null || true
        is_elf "$WORK/vmlinux" && return 0
    done
    return 1
}
if extract '\xFD7zXZ\x00' xz -dc --single-stream ||
    extract '\x1F\x8B\x08' gzip -dc ||
    extract '\x28\xB5\x2F\xFD' zstd -dc ||
    extract '\x5D\x00\x00\x00' xz -dc --format=lzma ||
    extract 'BZh' bzip2 -dc; then
    mv "$WORK/vmlinux" "$CACHE/vmlinux.new"
else
    # QEMU can also boot the bzImage directly; it is only ~2x slower to start.
    log "WARNING: could not extract vmlinux, using compressed $VMLINUZ"
    cp "$VMLINUZ" "$CACHE/vmlinux.new"
fi

# --- initramfs --------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,lib/modules}
cp "$WORK/busybox/bin/busybox" "$R/bin/busybox"
MODDIR=$WORK/kernel/lib/modules/$KVER
n=10
for m in netfs fscache 9pnet 9pnet_fd 9p \
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
    failover net_failover virtio_net; do
    alt=${m//_/-}
    ko=$(find "$MODDIR" \( -name "$m.ko*" -o -name "$alt.ko*" \) | head -1)
    if [[ -z $ko ]]; then
        if grep -qE "/($m|$alt)\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "$m is built in"
        else
            log "WARNING: module $m not found, skipped"
        fi
        continue
    fi
    out=$R/lib/modules/$n-$m.ko
    case $ko in
        *.ko) cp "$ko" "$out" ;;
        *.ko.xz) xz -dc "$ko" >"$out" ;;
        *.ko.gz) gzip -dc "$ko" >"$out" ;;
        *.ko.zst) zstd -dc "$ko" >"$out" ;;
        *) log "unknown module format $ko"; exit 1 ;;
    esac
    n=$((n + 1))
done

cat >"$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" || echo "init: insmod $m failed"; done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
stty -onlcr 2>/dev/null
dmesg -n 1  # keep kernel messages off the console while the test runs
echo; echo "@@FORNAX-VM-TEST-BEGIN@@"
cd /
{ sh /test.sh; echo $? >/tmp/rc; } </dev/null 2>&1
echo
echo "@@FORNAX-VM-TEST-END rc=$(cat /tmp/rc)@@"
echo "@@FORNAX-VM-DMESG-BEGIN@@"
dmesg | grep -iE '9p|v9fs'
echo "@@FORNAX-VM-DMESG-END@@"
poweroff -f
EOF
chmod 755 "$R/init"
(cd "$R" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet | gzip -9) >"$CACHE/base.cpio.gz.new"

mv "$CACHE/base.cpio.gz.new" "$CACHE/base.cpio.gz"
mv "$CACHE/vmlinux.new" "$CACHE/vmlinux"
echo "$KPKG $KVER" >"$CACHE/kernel-version"
rm -rf "$WORK"
echo "$STAMP" >"$CACHE/stamp"
log "built $CACHE/vmlinux ($KVER) and $CACHE/base.cpio.gz"
