package main

// OvfManager.CreateDescriptor, which 0.24.2 does not have.
//
// The descriptor is an OVF 1.x envelope shaped like vSphere's, with what virt-v2v's
// `-i ova` parser reads: References/File (href = the path the client gave for the
// disk's device id), DiskSection/Disk (capacity in bytes, fileRef), VirtualSystem/Name,
// OperatingSystemSection (vmw:osType = guestId), and in the VirtualHardwareSection the
// CPU item with vmw:CoresPerSocket, memory in MB, the disk controllers (rasd:InstanceID
// integers, which disks name as rasd:Parent), the disks in device order
// (rasd:HostResource ovf:/disk/ID), CD-ROMs, NICs (rasd:Address = MAC,
// rasd:ResourceSubType = adapter, rasd:Connection = port group) and
// vmw:Config firmware = bios|efi.

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// CreateDescriptor answers OvfManager.CreateDescriptor (routed here by the front
// handler) for a VM.
func (h *helper) CreateDescriptor(ctx *simulator.Context, req *types.CreateDescriptor) soap.HasFault {
	body := new(methods.CreateDescriptorBody)
	vm := vmByRef(req.Obj)
	if vm == nil {
		if req.Obj.Type == "VirtualMachine" {
			body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: req.Obj})
		} else {
			body.Fault_ = simulator.Fault("only VirtualMachine objects are supported", &types.NotSupported{})
		}
		return body
	}
	var ovf string
	simulator.Map.WithLock(vm, func() { ovf = describe(vm, &req.Cdp) })
	include := req.Cdp.IncludeImageFiles
	if include == nil {
		include = types.NewBool(false)
	}
	body.Res = &types.CreateDescriptorResponse{Returnval: types.OvfCreateDescriptorResult{
		OvfDescriptor:     ovf,
		IncludeImageFiles: include,
	}}
	return body
}

// ovfBuilder writes indented XML lines.
type ovfBuilder struct {
	strings.Builder
	depth int
}

func (b *ovfBuilder) line(format string, args ...interface{}) {
	b.WriteString(strings.Repeat("  ", b.depth))
	fmt.Fprintf(b, format, args...)
	b.WriteByte('\n')
}

func (b *ovfBuilder) open(format string, args ...interface{}) {
	b.line(format, args...)
	b.depth++
}

func (b *ovfBuilder) close(tag string) {
	b.depth--
	b.line("</%s>", tag)
}

// rasd writes <rasd:NAME>value</rasd:NAME>.
func (b *ovfBuilder) rasd(name string, value interface{}) {
	b.line("<rasd:%s>%s</rasd:%s>", name, esc(fmt.Sprint(value)), name)
}

func esc(s string) string {
	var sb strings.Builder
	_ = xml.EscapeText(&sb, []byte(s))
	return sb.String()
}

// ovfItem is one device of the VirtualHardwareSection.
type ovfItem struct {
	id     int
	device types.BaseVirtualDevice
}

// describe writes the descriptor. The caller holds the simulator's lock on vm.
func describe(vm *simulator.VirtualMachine, cdp *types.OvfCreateDescriptorParams) string {
	cfg := vm.Config
	devices := cfg.Hardware.Device
	name := vm.Name
	if cdp.Name != "" {
		name = cdp.Name
	}

	// Disk files and ids, in device order.
	type ovfDisk struct {
		disk     *types.VirtualDisk
		diskID   string
		fileID   string
		href     string
		size     int64
		capacity int64
	}
	files := map[string]types.OvfFile{}
	for _, f := range cdp.OvfFiles {
		files[f.DeviceId] = f
	}
	var disks []ovfDisk
	diskByKey := map[int32]ovfDisk{}
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		n := len(disks) + 1
		od := ovfDisk{
			disk:     disk,
			diskID:   fmt.Sprintf("vmdisk%d", n),
			fileID:   fmt.Sprintf("file%d", n),
			href:     fmt.Sprintf("%s-%d.vmdk", name, n),
			capacity: diskCapacity(disk),
		}
		if f, ok := files[deviceKey(vm, devices, disk)]; ok {
			od.href, od.size = f.Path, f.Size
		}
		disks = append(disks, od)
		diskByKey[disk.Key] = od
	}

	// InstanceIDs: 1 CPU, 2 memory, then the devices in device order.
	ids := map[int32]int{}
	var items []ovfItem
	next := 3
	for _, d := range devices {
		if itemResourceType(d) == 0 {
			continue
		}
		ids[d.GetVirtualDevice().Key] = next
		items = append(items, ovfItem{next, d})
		next++
	}

	var b ovfBuilder
	b.line(`<?xml version="1.0" encoding="UTF-8"?>`)
	b.open(`<Envelope vmw:buildId="build-v2k-testbed" xmlns="http://schemas.dmtf.org/ovf/envelope/1"` +
		` xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"` +
		` xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"` +
		` xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"` +
		` xmlns:vmw="http://www.vmware.com/schema/ovf"` +
		` xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"` +
		` xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`)

	b.open("<References>")
	for _, d := range disks {
		size := ""
		if d.size > 0 {
			size = fmt.Sprintf(` ovf:size="%d"`, d.size)
		}
		b.line(`<File ovf:href="%s" ovf:id="%s"%s/>`, esc(d.href), d.fileID, size)
	}
	b.close("References")

	b.open("<DiskSection>")
	b.line("<Info>Virtual disk information</Info>")
	for _, d := range disks {
		b.line(`<Disk ovf:capacity="%d" ovf:capacityAllocationUnits="byte" ovf:diskId="%s" ovf:fileRef="%s"`+
			` ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>`,
			d.capacity, d.diskID, d.fileID)
	}
	b.close("DiskSection")

	networks := nicNetworks(devices)
	b.open("<NetworkSection>")
	b.line("<Info>The list of logical networks</Info>")
	seen := map[string]bool{}
	for _, d := range devices {
		n, ok := networks[d.GetVirtualDevice().Key]
		if !ok || seen[n] {
			continue
		}
		seen[n] = true
		b.open(`<Network ovf:name="%s">`, esc(n))
		b.line("<Description>The %s network</Description>", esc(n))
		b.close("Network")
	}
	b.close("NetworkSection")

	b.open(`<VirtualSystem ovf:id="%s">`, esc(name))
	b.line("<Info>A virtual machine</Info>")
	b.line("<Name>%s</Name>", esc(name))
	description := cdp.Description
	if description == "" {
		description = cfg.Annotation
	}
	if description != "" {
		b.open("<AnnotationSection>")
		b.line("<Info>A human-readable annotation</Info>")
		b.line("<Annotation>%s</Annotation>", esc(description))
		b.close("AnnotationSection")
	}
	b.open(`<OperatingSystemSection ovf:id="%d" vmw:osType="%s">`, cimOSType(cfg.GuestId), esc(cfg.GuestId))
	b.line("<Info>The kind of installed guest operating system</Info>")
	if cfg.GuestFullName != "" {
		b.line("<Description>%s</Description>", esc(cfg.GuestFullName))
	}
	b.close("OperatingSystemSection")

	b.open("<VirtualHardwareSection>")
	b.line("<Info>Virtual hardware requirements</Info>")
	b.open("<System>")
	b.line("<vssd:ElementName>Virtual Hardware Family</vssd:ElementName>")
	b.line("<vssd:InstanceID>0</vssd:InstanceID>")
	b.line("<vssd:VirtualSystemIdentifier>%s</vssd:VirtualSystemIdentifier>", esc(name))
	version := cfg.Version
	if version == "" {
		version = "vmx-13"
	}
	b.line("<vssd:VirtualSystemType>%s</vssd:VirtualSystemType>", esc(version))
	b.close("System")

	cpus := cfg.Hardware.NumCPU
	cores := cfg.Hardware.NumCoresPerSocket
	if cores <= 0 {
		cores = 1
	}
	b.open("<Item>")
	b.rasd("AllocationUnits", "hertz * 10^6")
	b.rasd("Description", "Number of Virtual CPUs")
	b.rasd("ElementName", fmt.Sprintf("%d virtual CPU(s)", cpus))
	b.rasd("InstanceID", 1)
	b.rasd("ResourceType", 3)
	b.rasd("VirtualQuantity", cpus)
	b.line(`<vmw:CoresPerSocket ovf:required="false">%d</vmw:CoresPerSocket>`, cores)
	b.close("Item")

	b.open("<Item>")
	b.rasd("AllocationUnits", "byte * 2^20")
	b.rasd("Description", "Memory Size")
	b.rasd("ElementName", fmt.Sprintf("%dMB of memory", cfg.Hardware.MemoryMB))
	b.rasd("InstanceID", 2)
	b.rasd("ResourceType", 4)
	b.rasd("VirtualQuantity", cfg.Hardware.MemoryMB)
	b.close("Item")

	counts := map[int]int{}
	for _, it := range items {
		d := it.device
		dev := d.GetVirtualDevice()
		kind := itemResourceType(d)
		counts[kind]++
		n := counts[kind] - 1
		parent, hasParent := ids[dev.ControllerKey]
		unit := int32(0)
		if dev.UnitNumber != nil {
			unit = *dev.UnitNumber
		}

		b.open("<Item>")
		switch x := d.(type) {
		case types.BaseVirtualEthernetCard:
			card := x.GetVirtualEthernetCard()
			network := networks[dev.Key]
			adapter := nicSubType(d)
			b.rasd("Address", card.MacAddress)
			b.rasd("AddressOnParent", unit)
			b.rasd("AutomaticAllocation", connectedAtStart(dev))
			b.rasd("Connection", network)
			b.rasd("Description", fmt.Sprintf("%s ethernet adapter on %q", adapter, network))
			b.rasd("ElementName", fmt.Sprintf("Network adapter %d", n+1))
			b.rasd("InstanceID", it.id)
			b.rasd("ResourceSubType", adapter)
			b.rasd("ResourceType", kind)
			if card.WakeOnLanEnabled != nil {
				b.line(`<vmw:Config ovf:required="false" vmw:key="wakeOnLanEnabled" vmw:value="%t"/>`, *card.WakeOnLanEnabled)
			}
		case *types.VirtualDisk:
			od := diskByKey[dev.Key]
			b.rasd("AddressOnParent", unit)
			b.rasd("ElementName", fmt.Sprintf("Hard disk %d", n+1))
			b.rasd("HostResource", "ovf:/disk/"+od.diskID)
			b.rasd("InstanceID", it.id)
			if hasParent {
				b.rasd("Parent", parent)
			}
			b.rasd("ResourceType", kind)
		case *types.VirtualCdrom:
			b.rasd("AddressOnParent", unit)
			b.rasd("AutomaticAllocation", connectedAtStart(dev))
			b.rasd("ElementName", fmt.Sprintf("CD/DVD drive %d", n+1))
			b.rasd("InstanceID", it.id)
			if hasParent {
				b.rasd("Parent", parent)
			}
			b.rasd("ResourceSubType", cdromSubType(x))
			b.rasd("ResourceType", kind)
		default: // a controller
			bus := int32(0)
			if c, ok := d.(types.BaseVirtualController); ok {
				bus = c.GetVirtualController().BusNumber
			}
			label, sub := controllerNames(d)
			b.rasd("Address", bus)
			b.rasd("Description", label)
			b.rasd("ElementName", fmt.Sprintf("%s %d", label, bus))
			b.rasd("InstanceID", it.id)
			if sub != "" {
				b.rasd("ResourceSubType", sub)
			}
			b.rasd("ResourceType", kind)
		}
		b.close("Item")
	}

	firmware := cfg.Firmware
	if firmware == "" {
		firmware = string(types.GuestOsDescriptorFirmwareTypeBios)
	}
	b.line(`<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="%s"/>`, esc(firmware))
	if bo := cfg.BootOptions; bo != nil && bo.EfiSecureBootEnabled != nil {
		b.line(`<vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="%t"/>`,
			*bo.EfiSecureBootEnabled)
	}
	if cfg.Uuid != "" && hasOption(cdp.ExportOption, "uuid") {
		b.line(`<vmw:Config ovf:required="false" vmw:key="uuid" vmw:value="%s"/>`, esc(cfg.Uuid))
	}
	b.close("VirtualHardwareSection")
	b.close("VirtualSystem")
	b.close("Envelope")
	return b.String()
}

func hasOption(options []string, name string) bool {
	for _, o := range options {
		if o == name {
			return true
		}
	}
	return false
}

// itemResourceType is the CIM resource type of the devices the descriptor lists, 0 for
// the others (PCI and PS/2 controllers, keyboard, video, VMCI...).
func itemResourceType(d types.BaseVirtualDevice) int {
	switch d.(type) {
	case types.BaseVirtualSCSIController:
		return 6
	case *types.VirtualIDEController:
		return 5
	case types.BaseVirtualSATAController, *types.VirtualNVMEController:
		return 20
	case *types.VirtualDisk:
		return 17
	case *types.VirtualCdrom:
		return 15
	case types.BaseVirtualEthernetCard:
		return 10
	}
	return 0
}

// controllerNames gives vSphere's description and rasd:ResourceSubType of a controller.
func controllerNames(d types.BaseVirtualDevice) (string, string) {
	switch d.(type) {
	case *types.VirtualLsiLogicController:
		return "SCSI Controller", "lsilogic"
	case *types.VirtualLsiLogicSASController:
		return "SCSI Controller", "lsilogicsas"
	case *types.ParaVirtualSCSIController:
		return "SCSI Controller", "VirtualSCSI"
	case *types.VirtualBusLogicController:
		return "SCSI Controller", "buslogic"
	case *types.VirtualAHCIController, types.BaseVirtualSATAController:
		return "SATA Controller", "vmware.sata.ahci"
	case *types.VirtualNVMEController:
		return "NVMe Controller", "vmware.nvme.controller"
	case *types.VirtualIDEController:
		return "IDE Controller", "PIIX4"
	}
	return "Controller", ""
}

// nicSubType is vSphere's rasd:ResourceSubType of an ethernet card.
func nicSubType(d types.BaseVirtualDevice) string {
	switch d.(type) {
	case *types.VirtualE1000:
		return "E1000"
	case *types.VirtualE1000e:
		return "E1000e"
	case *types.VirtualVmxnet3:
		return "VmxNet3"
	case *types.VirtualVmxnet2:
		return "VmxNet2"
	case *types.VirtualVmxnet:
		return "VmxNet"
	case *types.VirtualPCNet32:
		return "PCNet32"
	case *types.VirtualSriovEthernetCard:
		return "SriovEthernetCard"
	}
	return strings.TrimPrefix(reflect.TypeOf(d).Elem().Name(), "Virtual")
}

func cdromSubType(c *types.VirtualCdrom) string {
	switch c.Backing.(type) {
	case *types.VirtualCdromIsoBackingInfo:
		return "vmware.cdrom.iso"
	case *types.VirtualCdromAtapiBackingInfo:
		return "vmware.cdrom.atapi"
	}
	return "vmware.cdrom.remotepassthrough"
}

func connectedAtStart(d *types.VirtualDevice) bool {
	return d.Connectable != nil && d.Connectable.StartConnected
}

// nicNetworks maps each NIC's device key to the name of its network or port group.
func nicNetworks(devices []types.BaseVirtualDevice) map[int32]string {
	names := map[int32]string{}
	for _, d := range devices {
		nic, ok := d.(types.BaseVirtualEthernetCard)
		if !ok {
			continue
		}
		card := nic.GetVirtualEthernetCard()
		name := ""
		switch b := card.Backing.(type) {
		case *types.VirtualEthernetCardNetworkBackingInfo:
			name = b.DeviceName
			if name == "" && b.Network != nil {
				name = entityName(*b.Network)
			}
		case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
			name = entityName(types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey})
			if name == "" {
				name = b.Port.PortgroupKey
			}
		case *types.VirtualEthernetCardOpaqueNetworkBackingInfo:
			name = b.OpaqueNetworkId
		}
		names[card.Key] = name
	}
	return names
}

func entityName(ref types.ManagedObjectReference) string {
	if e, ok := simulator.Map.Get(ref).(mo.Entity); ok {
		return e.Entity().Name
	}
	return ""
}

// cimOSType is the CIM operating system id OVF wants next to vmw:osType; virt-v2v
// reads neither (it inspects the guest), so a rough mapping does.
func cimOSType(guestID string) int {
	id := strings.ToLower(guestID)
	is64 := strings.Contains(id, "64")
	switch {
	case strings.HasPrefix(id, "windows") || strings.HasPrefix(id, "win"):
		if is64 {
			return 103 // Microsoft Windows Server 2003 64-Bit and later
		}
		return 105
	case strings.HasPrefix(id, "debian"):
		if is64 {
			return 96
		}
		return 95
	case strings.HasPrefix(id, "ubuntu"):
		if is64 {
			return 94
		}
		return 93
	case strings.HasPrefix(id, "rhel"), strings.HasPrefix(id, "centos"), strings.HasPrefix(id, "oracle"):
		if is64 {
			return 80
		}
		return 79
	case strings.Contains(id, "linux"):
		if is64 {
			return 101
		}
		return 36
	case is64:
		return 102 // Other 64-Bit
	}
	return 1 // Other
}
