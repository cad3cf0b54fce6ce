package main

// Fixes for the faults of govmomi 0.24.2's simulator that a pyvmomi client meets.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// ---- MAC addresses -------------------------------------------------------------
//
// 0.24.2 derives a NIC's MAC from three characters of the VM's UUID, so VMs easily
// share one. The front handler fills in a generated, inventory-wide unique MAC for
// every NIC that CreateVM or ReconfigVM adds without one; a MAC the client gives is
// kept, as vCenter keeps a manual one.

var macMu sync.Mutex
var macsGiven = map[string]bool{}

// inventoryMACs is every NIC's MAC in the inventory, lower case.
func inventoryMACs() map[string]bool {
	seen := map[string]bool{}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			if vm.Config == nil {
				return
			}
			for _, d := range vm.Config.Hardware.Device {
				if nic, ok := d.(types.BaseVirtualEthernetCard); ok {
					seen[strings.ToLower(nic.GetVirtualEthernetCard().MacAddress)] = true
				}
			}
		})
	}
	return seen
}

// newMAC returns a MAC that no NIC has and that was never handed out before: in
// vCenter's range (00:50:56:80-bf:..) or, for the ESXi model, in ESXi's (00:0c:29:..).
// The caller holds macMu; inUse is inventoryMACs().
func newMAC(inUse map[string]bool) string {
	for {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			panic(err)
		}
		var mac string
		if simulator.Map.IsESX() {
			mac = fmt.Sprintf("00:0c:29:%02x:%02x:%02x", b[0], b[1], b[2])
		} else {
			mac = fmt.Sprintf("00:50:56:%02x:%02x:%02x", 0x80|(b[0]&0x3f), b[1], b[2])
		}
		if !inUse[mac] && !macsGiven[mac] {
			macsGiven[mac] = true
			return mac
		}
	}
}

// assignMACs fills in the MAC of NICs that a device change adds (or edits) without
// one. vm is the VM being reconfigured, nil for CreateVM: an edit keeps its NIC's
// current MAC.
func assignMACs(vm *simulator.VirtualMachine, changes []types.BaseVirtualDeviceConfigSpec) {
	macMu.Lock()
	defer macMu.Unlock()
	var inUse map[string]bool
	for _, c := range changes {
		spec := c.GetVirtualDeviceConfigSpec()
		nic, ok := spec.Device.(types.BaseVirtualEthernetCard)
		if !ok {
			continue
		}
		card := nic.GetVirtualEthernetCard()
		if card.MacAddress != "" {
			macsGiven[strings.ToLower(card.MacAddress)] = true
			continue
		}
		switch spec.Operation {
		case types.VirtualDeviceConfigSpecOperationAdd:
		case types.VirtualDeviceConfigSpecOperationEdit:
			if vm != nil {
				if mac := currentMAC(vm, card.Key); mac != "" {
					card.MacAddress = mac
					continue
				}
			}
		default:
			continue
		}
		if inUse == nil {
			inUse = inventoryMACs()
		}
		card.MacAddress = newMAC(inUse)
		if card.AddressType == "" {
			card.AddressType = string(types.VirtualEthernetCardMacTypeGenerated)
		}
	}
}

func currentMAC(vm *simulator.VirtualMachine, key int32) string {
	mac := ""
	simulator.Map.WithLock(vm, func() {
		for _, d := range vm.Config.Hardware.Device {
			if nic, ok := d.(types.BaseVirtualEthernetCard); ok && d.GetVirtualDevice().Key == key {
				mac = nic.GetVirtualEthernetCard().MacAddress
			}
		}
	})
	return mac
}

// regenerateMACs gives the VM's NICs new MACs, except manual ones when keepManual,
// and the ones that keep returns true for. It also updates guest.net. The caller
// holds macMu.
func regenerateMACs(vm *simulator.VirtualMachine, keepManual bool, keep func(mac string) bool) {
	inUse := inventoryMACs()
	simulator.Map.WithLock(vm, func() {
		for _, d := range vm.Config.Hardware.Device {
			nic, ok := d.(types.BaseVirtualEthernetCard)
			if !ok {
				continue
			}
			card := nic.GetVirtualEthernetCard()
			if keepManual && card.AddressType == string(types.VirtualEthernetCardMacTypeManual) {
				continue
			}
			if keep(strings.ToLower(card.MacAddress)) {
				continue
			}
			card.MacAddress = newMAC(inUse)
			for i := range vm.Guest.Net {
				if vm.Guest.Net[i].DeviceConfigId == card.Key {
					vm.Guest.Net[i].MacAddress = card.MacAddress
				}
			}
		}
	})
}

// fixModelMACs gives the VMs the model created at start-up distinct MACs.
func fixModelMACs() {
	macMu.Lock()
	defer macMu.Unlock()
	seen := map[string]bool{}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		regenerateMACs(vm, true, func(mac string) bool {
			if mac == "" || seen[mac] {
				return false
			}
			seen[mac] = true
			return true
		})
	}
}

// ---- Attaching an existing disk ---------------------------------------------------
//
// 0.24.2 checks that an existing disk added without a file operation exists by looking
// for X-flat.vmdk first, so a self-contained X.vmdk (streamOptimized, as a test puts
// it into the datastore) fails with FileNotFound. The front handler creates an empty
// X-flat.vmdk placeholder next to such an X.vmdk; the simulator deletes both files
// with the disk. ExportVm serves X.vmdk.

func placeholderFlats(where types.ManagedObjectReference, changes []types.BaseVirtualDeviceConfigSpec) {
	dc := datacenterOf(where)
	if dc == nil {
		return
	}
	for _, c := range changes {
		spec := c.GetVirtualDeviceConfigSpec()
		disk, ok := spec.Device.(*types.VirtualDisk)
		if !ok || spec.Operation != types.VirtualDeviceConfigSpecOperationAdd || spec.FileOperation != "" {
			continue
		}
		b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue
		}
		info := b.GetVirtualDeviceFileBackingInfo()
		if !strings.HasSuffix(info.FileName, ".vmdk") || strings.HasSuffix(info.FileName, "-flat.vmdk") {
			continue
		}
		file, err := resolvePath(info.FileName, info.Datastore, dc.Datastore)
		if err != nil {
			continue
		}
		flat := strings.TrimSuffix(file, ".vmdk") + "-flat.vmdk"
		if _, err := os.Stat(file); err != nil {
			continue
		}
		if _, err := os.Stat(flat); os.IsNotExist(err) {
			if f, err := os.OpenFile(flat, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err == nil {
				_ = f.Close()
			}
		}
	}
}

// ---- CloneVM_Task: see clone.go ------------------------------------------------------

var taskReturnval = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

// copyCloneDisks copies each source disk's file(s) over the clone's new (empty) disk
// of the same device key, or failing that of the same position.
func copyCloneDisks(src *simulator.VirtualMachine, srcDevices []types.BaseVirtualDevice, clone *simulator.VirtualMachine) error {
	type pair struct{ from, to string }
	var pairs []pair
	var err error
	simulator.Map.WithLock(clone, func() {
		var srcDisks, dstDisks []*types.VirtualDisk
		for _, d := range srcDevices {
			if disk, ok := d.(*types.VirtualDisk); ok {
				srcDisks = append(srcDisks, disk)
			}
		}
		for _, d := range clone.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok {
				dstDisks = append(dstDisks, disk)
			}
		}
		for i, s := range srcDisks {
			var dst *types.VirtualDisk
			for _, d := range dstDisks {
				if d.Key == s.Key {
					dst = d
				}
			}
			if dst == nil && i < len(dstDisks) {
				dst = dstDisks[i]
			}
			if dst == nil {
				continue
			}
			from, e1 := diskFile(src, s)
			to, e2 := diskFile(clone, dst)
			if e1 != nil || e2 != nil {
				err = fmt.Errorf("%v %v", e1, e2)
				continue
			}
			pairs = append(pairs, pair{from, to})
		}
	})
	for _, p := range pairs {
		if e := copyDisk(p.from, p.to); e != nil {
			err = e
		}
	}
	return err
}

// copyDisk copies a VMDK. A text descriptor (monolithicFlat and the like) has its
// extent files copied too, renamed after the new descriptor's name.
func copyDisk(from, to string) error {
	data, err := readSmallText(from)
	if err != nil {
		return err
	}
	if data == nil { // not a descriptor: one self-contained file
		return copyFile(from, to)
	}
	srcBase := strings.TrimSuffix(filepath.Base(from), ".vmdk")
	dstBase := strings.TrimSuffix(filepath.Base(to), ".vmdk")
	var out bytes.Buffer
	for _, line := range strings.SplitAfter(string(data), "\n") {
		text := strings.TrimRight(line, "\r\n")
		eol := line[len(text):]
		if m := extentLine.FindStringSubmatch(text); m != nil {
			name := m[2]
			newName := name
			if strings.HasPrefix(name, srcBase) {
				newName = dstBase + strings.TrimPrefix(name, srcBase)
			}
			if err := copyFile(filepath.Join(filepath.Dir(from), name), filepath.Join(filepath.Dir(to), newName)); err != nil {
				return err
			}
			line = m[1] + `"` + newName + `"` + m[3] + eol
		}
		out.WriteString(line)
	}
	return os.WriteFile(to, out.Bytes(), 0o600)
}

// extentLine matches a VMDK descriptor's extent line: RW 2048 FLAT "x-flat.vmdk" 0
var extentLine = regexp.MustCompile(`^((?:RW|RDONLY|NOACCESS)\s+\d+\s+\S+\s+)"([^"/]+)"(.*)$`)

// readSmallText returns the content of a VMDK text descriptor, or nil for anything else.
func readSmallText(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, 64*1024+1)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, err
	}
	if n > 64*1024 || !bytes.HasPrefix(head[:n], []byte("# Disk DescriptorFile")) {
		return nil, nil
	}
	return head[:n], nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// deepCopy copies a value of the vim25 types (structs, pointers, slices, maps and
// interfaces of them), so that the copy shares nothing with the original.
func deepCopy(v interface{}) interface{} {
	if v == nil {
		return nil
	}
	return copyValue(reflect.ValueOf(v)).Interface()
}

func copyValue(v reflect.Value) reflect.Value {
	switch v.Kind() {
	case reflect.Ptr:
		if v.IsNil() {
			return v
		}
		c := reflect.New(v.Type().Elem())
		c.Elem().Set(copyValue(v.Elem()))
		return c
	case reflect.Interface:
		if v.IsNil() {
			return v
		}
		c := reflect.New(v.Type()).Elem()
		c.Set(copyValue(v.Elem()))
		return c
	case reflect.Struct:
		c := reflect.New(v.Type()).Elem()
		c.Set(v) // unexported fields (none in vim25 types) stay shallow
		for i := 0; i < v.NumField(); i++ {
			if c.Field(i).CanSet() {
				c.Field(i).Set(copyValue(v.Field(i)))
			}
		}
		return c
	case reflect.Slice:
		if v.IsNil() {
			return v
		}
		c := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		for i := 0; i < v.Len(); i++ {
			c.Index(i).Set(copyValue(v.Index(i)))
		}
		return c
	case reflect.Map:
		if v.IsNil() {
			return v
		}
		c := reflect.MakeMapWithSize(v.Type(), v.Len())
		for _, k := range v.MapKeys() {
			c.SetMapIndex(k, copyValue(v.MapIndex(k)))
		}
		return c
	default:
		return v
	}
}

// ---- PropertyCollector: Fetch of an unset property ----------------------------------
//
// pyvmomi reads every property with the internal Fetch method. For an unset property
// (vm.snapshot without snapshots, vm.parentVApp...) 0.24.2's Fetch indexes an empty
// MissingSet and panics, and net/http drops the connection. vCenter answers an empty
// FetchResponse, which pyvmomi reads as None (or an empty list).

func (f *front) fetch(w http.ResponseWriter, r *http.Request, body []byte) {
	rec := httptest.NewRecorder()
	recovered := func() (p interface{}) {
		defer func() { p = recover() }()
		f.forward(rec, r, body)
		return nil
	}()
	if recovered == nil {
		replay(w, rec)
		return
	}
	if err, ok := recovered.(runtime.Error); ok && strings.Contains(err.Error(), "index out of range") {
		writeSOAP(w, http.StatusOK, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
		return
	}
	panic(recovered)
}
