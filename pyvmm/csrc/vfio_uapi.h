/*
 * The subset of the VFIO and iommufd uAPI that pyvmm uses (include/uapi/linux/vfio.h and
 * iommufd.h), declared here because the build machines carry 6.1 headers: they have the
 * legacy container/group ioctls but neither the VFIO device cdev ioctls nor <linux/iommufd.h>
 * (both 6.6+). Layouts are x86_64. tests/test_uapi.py compares what the system headers do
 * define with these declarations; the cdev and iommufd values are checked against the
 * numbers written down in ../shared/notes/uapi.md.
 *
 * Structures keep the shortest layout every kernel accepts: newer kernels append optional
 * fields (a pad to vfio_device_info, a token to the BIND argument, a pasid to ATTACH) and
 * take the shorter argsz unchanged.
 *
 * As in kvm_uapi.h, the text between the cdef markers goes to cffi's cdef(), and every
 * "#define NAME" below becomes a constant of pyvmm._native.
 */
#ifndef PYVMM_VFIO_UAPI_H
#define PYVMM_VFIO_UAPI_H
#include <stdint.h>
#include <linux/ioctl.h>
#define VFIO_TYPE (';')
#define VFIO_BASE 100
/* cdef-begin */
struct vfio_info_cap_header {
	uint16_t id;
	uint16_t version;
	uint32_t next;
};
struct vfio_group_status {
	uint32_t argsz;
	uint32_t flags;
};
struct vfio_device_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t num_regions;
	uint32_t num_irqs;
	uint32_t cap_offset;
};
struct vfio_region_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t cap_offset;
	uint64_t size;
	uint64_t offset;
};
struct vfio_region_sparse_mmap_area {
	uint64_t offset;
	uint64_t size;
};
struct vfio_region_info_cap_sparse_mmap {
	struct vfio_info_cap_header header;
	uint32_t nr_areas;
	uint32_t reserved;
	struct vfio_region_sparse_mmap_area areas[];
};
struct vfio_irq_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t count;
};
struct vfio_irq_set {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t start;
	uint32_t count;
	uint8_t data[];
};
struct vfio_iommu_type1_dma_map {
	uint32_t argsz;
	uint32_t flags;
	uint64_t vaddr;
	uint64_t iova;
	uint64_t size;
};
struct vfio_iommu_type1_dma_unmap {
	uint32_t argsz;
	uint32_t flags;
	uint64_t iova;
	uint64_t size;
};
struct vfio_device_bind_iommufd {
	uint32_t argsz;
	uint32_t flags;
	int32_t iommufd;
	uint32_t out_devid;
};
struct vfio_device_attach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
	uint32_t pt_id;
};
struct vfio_device_detach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
};
struct iommu_destroy {
	uint32_t size;
	uint32_t id;
};
struct iommu_ioas_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_ioas_id;
};
struct iommu_ioas_map {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t __reserved;
	uint64_t user_va;
	uint64_t length;
	uint64_t iova;
};
struct iommu_ioas_unmap {
	uint32_t size;
	uint32_t ioas_id;
	uint64_t iova;
	uint64_t length;
};
/* cdef-end */
/* the container, /dev/vfio/vfio */
#define VFIO_GET_API_VERSION _IO(VFIO_TYPE, VFIO_BASE + 0)
#define VFIO_CHECK_EXTENSION _IO(VFIO_TYPE, VFIO_BASE + 1)
#define VFIO_SET_IOMMU _IO(VFIO_TYPE, VFIO_BASE + 2)
#define VFIO_IOMMU_MAP_DMA _IO(VFIO_TYPE, VFIO_BASE + 13)
#define VFIO_IOMMU_UNMAP_DMA _IO(VFIO_TYPE, VFIO_BASE + 14)
/* a group, /dev/vfio/N */
#define VFIO_GROUP_GET_STATUS _IO(VFIO_TYPE, VFIO_BASE + 3)
#define VFIO_GROUP_SET_CONTAINER _IO(VFIO_TYPE, VFIO_BASE + 4)
#define VFIO_GROUP_UNSET_CONTAINER _IO(VFIO_TYPE, VFIO_BASE + 5)
#define VFIO_GROUP_GET_DEVICE_FD _IO(VFIO_TYPE, VFIO_BASE + 6)
/* a device, from the group or a bound cdev */
#define VFIO_DEVICE_GET_INFO _IO(VFIO_TYPE, VFIO_BASE + 7)
#define VFIO_DEVICE_GET_REGION_INFO _IO(VFIO_TYPE, VFIO_BASE + 8)
#define VFIO_DEVICE_GET_IRQ_INFO _IO(VFIO_TYPE, VFIO_BASE + 9)
#define VFIO_DEVICE_SET_IRQS _IO(VFIO_TYPE, VFIO_BASE + 10)
#define VFIO_DEVICE_RESET _IO(VFIO_TYPE, VFIO_BASE + 11)
/* a device cdev, /dev/vfio/devices/vfioN (6.6+) */
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#define VFIO_DEVICE_DETACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 20)
/* /dev/iommu (6.2+) */
#define IOMMU_DESTROY _IO(VFIO_TYPE, 0x80)
#define IOMMU_IOAS_ALLOC _IO(VFIO_TYPE, 0x81)
#define IOMMU_IOAS_MAP _IO(VFIO_TYPE, 0x85)
#define IOMMU_IOAS_UNMAP _IO(VFIO_TYPE, 0x86)
/* values */
#define VFIO_API_VERSION 0
#define VFIO_TYPE1v2_IOMMU 3
#define VFIO_GROUP_FLAGS_VIABLE 1
#define VFIO_GROUP_FLAGS_CONTAINER_SET 2
#define VFIO_DEVICE_FLAGS_RESET 1
#define VFIO_DEVICE_FLAGS_PCI 2
#define VFIO_REGION_INFO_FLAG_READ 1
#define VFIO_REGION_INFO_FLAG_WRITE 2
#define VFIO_REGION_INFO_FLAG_MMAP 4
#define VFIO_REGION_INFO_FLAG_CAPS 8
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP 1
#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE 3
#define VFIO_PCI_BAR0_REGION_INDEX 0
#define VFIO_PCI_ROM_REGION_INDEX 6
#define VFIO_PCI_CONFIG_REGION_INDEX 7
#define VFIO_PCI_INTX_IRQ_INDEX 0
#define VFIO_PCI_MSI_IRQ_INDEX 1
#define VFIO_PCI_MSIX_IRQ_INDEX 2
#define VFIO_IRQ_INFO_EVENTFD 1
#define VFIO_IRQ_INFO_MASKABLE 2
#define VFIO_IRQ_INFO_AUTOMASKED 4
#define VFIO_IRQ_INFO_NORESIZE 8
#define VFIO_IRQ_SET_DATA_NONE 1
#define VFIO_IRQ_SET_DATA_BOOL 2
#define VFIO_IRQ_SET_DATA_EVENTFD 4
#define VFIO_IRQ_SET_ACTION_MASK 8
#define VFIO_IRQ_SET_ACTION_UNMASK 16
#define VFIO_IRQ_SET_ACTION_TRIGGER 32
#define VFIO_DMA_MAP_FLAG_READ 1
#define VFIO_DMA_MAP_FLAG_WRITE 2
#define IOMMU_IOAS_MAP_FIXED_IOVA 1
#define IOMMU_IOAS_MAP_WRITEABLE 2
#define IOMMU_IOAS_MAP_READABLE 4
#endif
