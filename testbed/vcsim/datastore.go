package main

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// vmByRef returns the simulator's VM for a moref, or nil.
func vmByRef(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	if ref.Type != "VirtualMachine" {
		return nil
	}
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

// datastoreFile resolves a datastore path ("[LocalDS_0] vm/vm.vmdk") of a VM's device
// to the file on this machine. ds is the datastore the device backing names, if any;
// otherwise the datastore is looked up by name among the VM's and its host's.
func datastoreFile(vm *simulator.VirtualMachine, ds *types.ManagedObjectReference, name string) (string, error) {
	refs := append([]types.ManagedObjectReference(nil), vm.Datastore...)
	if vm.Runtime.Host != nil {
		if h, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem); ok {
			refs = append(refs, h.Datastore...)
		}
	}
	return resolvePath(name, ds, refs)
}

// resolvePath resolves a datastore path with the datastore ds if given, else with
// the one of that name among candidates.
func resolvePath(name string, ds *types.ManagedObjectReference, candidates []types.ManagedObjectReference) (string, error) {
	var p object.DatastorePath
	if !p.FromString(name) || p.Datastore == "" {
		return "", fmt.Errorf("not a datastore path: %q", name)
	}

	var store *simulator.Datastore
	if ds != nil {
		store, _ = simulator.Map.Get(*ds).(*simulator.Datastore)
	}
	if store == nil {
		for _, ref := range candidates {
			if d, ok := simulator.Map.Get(ref).(*simulator.Datastore); ok && d.Name == p.Datastore {
				store = d
				break
			}
		}
	}
	if store == nil {
		return "", fmt.Errorf("datastore %q not found", p.Datastore)
	}

	root := filepath.Clean(store.Info.GetDatastoreInfo().Url)
	file := filepath.Join(root, filepath.FromSlash(p.Path))
	if !strings.HasPrefix(file, root+string(filepath.Separator)) {
		return "", fmt.Errorf("path outside its datastore: %q", name)
	}
	return file, nil
}

// datacenterOf walks up the inventory from an entity to its datacenter.
func datacenterOf(ref types.ManagedObjectReference) *simulator.Datacenter {
	for i := 0; i < 64; i++ {
		obj := simulator.Map.Get(ref)
		if dc, ok := obj.(*simulator.Datacenter); ok {
			return dc
		}
		e, ok := obj.(mo.Entity)
		if !ok || e.Entity().Parent == nil {
			return nil
		}
		ref = *e.Entity().Parent
	}
	return nil
}

// diskFile is the file on this machine that backs a virtual disk.
func diskFile(vm *simulator.VirtualMachine, disk *types.VirtualDisk) (string, error) {
	b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
	if !ok {
		return "", fmt.Errorf("disk %d has no file backing", disk.Key)
	}
	info := b.GetVirtualDeviceFileBackingInfo()
	return datastoreFile(vm, info.Datastore, info.FileName)
}
