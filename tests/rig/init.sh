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

RUN= REPO= EDU= NVME= NONVIABLE= UNBOUND=
for w in $(cat /proc/cmdline); do
	case "$w" in
	pyvmm_rig.run=*) RUN=${w#*=} ;;
	pyvmm_rig.repo=*) REPO=${w#*=} ;;
	pyvmm_rig.edu=*) EDU=${w#*=} ;;
	pyvmm_rig.nvme=*) NVME=${w#*=} ;;
	pyvmm_rig.nonviable=*) NONVIABLE=${w#*=} ;;
	pyvmm_rig.unbound=*) UNBOUND=${w#*=} ;;
	esac
done
[ -n "$RUN" ] && [ -n "$REPO" ] && [ -n "$EDU" ] && [ -n "$NVME" ] && [ -n "$NONVIABLE" ] &&
	[ -n "$UNBOUND" ] || die "kernel command line lacks pyvmm_rig.run/.repo/.edu/.nvme/..."

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

# PCI devices, at the fixed addresses boot.py gives them (tests/rig/__init__.py).
pci_id() { echo "$(cat "/sys/bus/pci/devices/$1/vendor"):$(cat "/sys/bus/pci/devices/$1/device")"; }
pci_driver() { d=$(readlink "/sys/bus/pci/devices/$1/driver") && echo "${d##*/}"; }
expect() { # BDF VENDOR:DEVICE WHAT
	[ "$(pci_id "$1" 2>/dev/null)" = "$2" ] || die "no $3 ($2) at $1: QEMU's -device list changed?"
}
to_vfio() { # BDF WHAT: driver_override + drivers_probe, as for real hardware
	[ -z "$(pci_driver "$1")" ] || echo "$1" >"/sys/bus/pci/devices/$1/driver/unbind"
	echo vfio-pci >"/sys/bus/pci/devices/$1/driver_override"
	echo "$1" >/sys/bus/pci/drivers_probe
	[ "$(pci_driver "$1")" = vfio-pci ] || die "bind $2 $1 to vfio-pci"
}
expect "$EDU" 0x1234:0x11e8 edu
expect "$NVME" 0x1b36:0x0010 "NVMe controller"
expect "$NONVIABLE" 0x1234:0x11e8 "edu behind the PCI bridge"
expect "$UNBOUND" 0x1b36:0x0002 "pci-serial behind the PCI bridge"
to_vfio "$EDU" edu
to_vfio "$NVME" nvme
to_vfio "$NONVIABLE" edu
# The 8250 driver (built in) holds the pci-serial, so the group it shares with
# $NONVIABLE is not viable.
[ "$(pci_driver "$UNBOUND")" = serial ] || die "pci-serial $UNBOUND not on the serial driver"
g=$(readlink "/sys/bus/pci/devices/$NONVIABLE/iommu_group")
[ -e "/sys/kernel/iommu_groups/${g##*/}/devices/$UNBOUND" ] ||
	die "$NONVIABLE and $UNBOUND not in one IOMMU group"

# One plain mtty mdev and one of the kvm-requiring variant.
MTTY=@MTTY_UUID@
MTTY_KVM=@MTTY_KVM_UUID@
echo "$MTTY" >/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create ||
	die "create the mtty mdev"
echo "$MTTY_KVM" >/sys/class/mdev_bus/mtty_kvm/mdev_supported_types/mtty_kvm-1/create ||
	die "create the mtty_kvm mdev"
[ -c /dev/iommu ] || die "no /dev/iommu"
P=/sys/bus/pci/devices M=/sys/bus/mdev/devices
for dev in "$P/$EDU" "$P/$NVME" "$P/$NONVIABLE" "$M/$MTTY" "$M/$MTTY_KVM"; do
	g=$(readlink "$dev/iommu_group") || die "no IOMMU group for $dev"
	[ -c "/dev/vfio/${g##*/}" ] || die "no /dev/vfio/${g##*/} for $dev"
	c=$(ls "$dev/vfio-dev" 2>/dev/null)
	[ -c "/dev/vfio/devices/$c" ] || die "no VFIO device cdev for $dev"
done

cat >/host/run/pyvmm-rig.env <<EOF
export PYVMM_RIG=1
export PYVMM_RIG_EDU=$EDU
export PYVMM_RIG_NVME=$NVME
export PYVMM_RIG_NONVIABLE=$NONVIABLE
export PYVMM_RIG_UNBOUND=$UNBOUND
export PYVMM_RIG_MTTY=$MTTY
export PYVMM_RIG_MTTY_KVM=$MTTY_KVM
EOF
echo "rig-init: inner system ready ${EDU:+(edu $EDU) }$(cut -d' ' -f1 /proc/uptime)s after boot"

chroot /host /bin/sh "$RUN/job.sh" </dev/null
rc=$?
[ -e "/host$RUN/status" ] || echo "$rc" >"/host$RUN/status"
sync
poweroff -f
