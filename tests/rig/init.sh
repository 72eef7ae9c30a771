#!/bin/sh
# PID 1 of the rig's inner Linux (busybox sh, from the initramfs).
#
# Loads the modules, mounts the host's root read-only over 9p at /host, the
# project tree (writable) and the run directory at their host paths inside
# it, prepares the devices tests use, then runs the job in a chroot of /host
# and leaves its exit status in the run directory before powering off.
# Any failure prints "rig-init: FAILED: <step>" (the harness reports it) and
# powers off, so QEMU never hangs.
/bin/busybox --install -s /bin
export PATH=/bin

die() {
	echo "rig-init: FAILED: $*"
	poweroff -f
	sleep 10
}

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sys /sys || die "mount /sys"
mount -t devtmpfs dev /dev || die "mount /dev"
# The serial console would turn \n into \r\n in everything the job prints.
stty -onlcr 2>/dev/null

RUN= REPO=
for w in $(cat /proc/cmdline); do
	case "$w" in
	pyvmm_rig.run=*) RUN=${w#*=} ;;
	pyvmm_rig.repo=*) REPO=${w#*=} ;;
	esac
done
[ -n "$RUN" ] && [ -n "$REPO" ] || die "kernel command line lacks pyvmm_rig.run/.repo"

while read -r m; do
	insmod "/lib/modules/$m.ko" || die "load module $m"
done </lib/modules/order
[ -c /dev/kvm ] || die "no /dev/kvm after loading kvm_amd (does the CPU model have SVM?)"

# The host's root read-only; the project tree and the run directory writable.
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$O,ro,cache=loose" hostroot /host || die "mount host root over 9p"
for d in tmp run dev/shm; do
	mount -t tmpfs -o mode=1777 tmpfs "/host/$d" || die "mount tmpfs on /$d"
done
# After the tmpfs mounts, so a project tree under /tmp (a CI clone, say) stays visible; its
# mount point may then lie in a tmpfs and need creating.
mkdir -p "/host$REPO" "/host$RUN" 2>/dev/null
mount -t 9p -o "$O" rigrepo "/host$REPO" || die "mount the project tree over 9p"
mount -t 9p -o "$O" rigrun "/host$RUN" || die "mount the run directory over 9p"
mount -t proc proc /host/proc || die "mount /proc in the chroot"
mount -t sysfs sys /host/sys || die "mount /sys in the chroot"
mount -t devtmpfs dev /host/dev || die "mount /dev in the chroot"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm || die "mount /dev/shm"
mount -t tracefs tracefs /host/sys/kernel/tracing || die "mount tracefs"

# edu (1234:11e8) to vfio-pci: gives /dev/vfio/N and /dev/vfio/devices/vfioM.
EDU=
for d in /sys/bus/pci/devices/*; do
	if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
		EDU=${d##*/}
	fi
done
[ -n "$EDU" ] || die "no edu PCI device (QEMU lacks -device edu?)"
echo vfio-pci >"/sys/bus/pci/devices/$EDU/driver_override"
echo "$EDU" >/sys/bus/pci/drivers_probe
[ -e "/sys/bus/pci/drivers/vfio-pci/$EDU" ] || die "bind edu $EDU to vfio-pci"

# One plain mtty mdev and one of the kvm-requiring variant.
MTTY=@MTTY_UUID@
MTTY_KVM=@MTTY_KVM_UUID@
echo "$MTTY" >/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create ||
	die "create the mtty mdev"
echo "$MTTY_KVM" >/sys/class/mdev_bus/mtty_kvm/mdev_supported_types/mtty_kvm-1/create ||
	die "create the mtty_kvm mdev"
[ -c /dev/iommu ] || die "no /dev/iommu"
for dev in "/sys/bus/pci/devices/$EDU" "/sys/bus/mdev/devices/$MTTY" "/sys/bus/mdev/devices/$MTTY_KVM"; do
	g=$(readlink "$dev/iommu_group") || die "no IOMMU group for $dev"
	[ -c "/dev/vfio/${g##*/}" ] || die "no /dev/vfio/${g##*/} for $dev"
	c=$(ls "$dev/vfio-dev" 2>/dev/null)
	[ -c "/dev/vfio/devices/$c" ] || die "no VFIO device cdev for $dev"
done

cat >/host/run/pyvmm-rig.env <<EOF
export PYVMM_RIG=1
export PYVMM_RIG_EDU=$EDU
export PYVMM_RIG_MTTY=$MTTY
export PYVMM_RIG_MTTY_KVM=$MTTY_KVM
EOF
echo "rig-init: inner system ready ${EDU:+(edu $EDU) }$(cut -d' ' -f1 /proc/uptime)s after boot"

chroot /host /bin/sh "$RUN/job.sh" </dev/null
rc=$?
[ -e "/host$RUN/status" ] || echo "$rc" >"/host$RUN/status"
sync
poweroff -f
