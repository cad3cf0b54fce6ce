package main

// VirtualMachine.ExportVm and its HttpNfcLease, which 0.24.2 does not have.
//
// The simulator's own HttpNfcLease (for ImportVApp) keeps its files in an unexported
// field and serves GET without Range, so export leases are the test bed's own managed
// objects, registered in the simulator's registry: the simulator dispatches
// HttpNfcLeaseProgress/Complete/Abort/GetManifest to them and its PropertyCollector
// reads their `info` and `state`. Their device URLs are served by the front handler.

import (
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const nfcPrefix = "/nfc/"

// helperType is the managed object type the front handler rewrites a call's _this to,
// so that the simulator dispatches it to a helper (see router.go).
const helperType = "V2kTestbedHelper"

// helper answers the methods 0.24.2 lacks. There is one per VM that ExportVm was
// called on (its moref value is the VM's) and one standing in for the OvfManager.
type helper struct {
	mo.ExtensibleManagedObject
	vm types.ManagedObjectReference
}

var helpersMu sync.Mutex

// helperFor returns the helper's moref for a VM, registering the helper on first use.
func (f *front) helperFor(vm types.ManagedObjectReference) types.ManagedObjectReference {
	ref := types.ManagedObjectReference{Type: helperType, Value: vm.Value}
	helpersMu.Lock()
	defer helpersMu.Unlock()
	if simulator.Map.Get(ref) == nil {
		h := &helper{vm: vm}
		h.Self = ref
		simulator.Map.Put(h)
	}
	return ref
}

func (f *front) ovfHelper() types.ManagedObjectReference {
	return f.helperFor(types.ManagedObjectReference{Type: "OvfManager", Value: "OvfManager"})
}

// exportLease is an HttpNfcLease for ExportVm. Its device URLs work while its state is
// ready; Complete, Abort or the lease timeout end it, and the URLs then answer 404.
type exportLease struct {
	mo.HttpNfcLease

	id      string
	files   map[string]string // URL file name (disk-0.vmdk) -> path on this machine
	keys    map[string]string // URL file name -> deviceUrl key
	timeout time.Duration

	mu         sync.Mutex
	lastActive time.Time
}

// exports keeps the live export leases by the id in their URLs.
type exports struct {
	mu           sync.Mutex
	leases       map[string]*exportLease
	timeout      time.Duration
	faults       *faults
	thumbprint   string
	stopWatching chan struct{}
}

func newExports(timeout time.Duration, f *faults) *exports {
	e := &exports{
		leases:       make(map[string]*exportLease),
		timeout:      timeout,
		faults:       f,
		stopWatching: make(chan struct{}),
	}
	go e.watch()
	return e
}

func (e *exports) stop() {
	close(e.stopWatching)
}

// watch ends leases that saw neither HttpNfcLeaseProgress nor a transfer for their
// timeout, as vSphere does: a client must keep a long export alive.
func (e *exports) watch() {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-e.stopWatching:
			return
		case now := <-tick.C:
			e.mu.Lock()
			var expired []*exportLease
			for _, l := range e.leases {
				l.mu.Lock()
				if now.Sub(l.lastActive) > l.timeout {
					expired = append(expired, l)
				}
				l.mu.Unlock()
			}
			e.mu.Unlock()
			for _, l := range expired {
				logf("export lease %s timed out", l.id)
				simulator.Map.WithLock(l, func() {
					e.end(l, types.HttpNfcLeaseStateError, &types.LocalizedMethodFault{
						Fault:            &types.Timedout{},
						LocalizedMessage: "The lease timed out.",
					})
				})
			}
		}
	}
}

func (l *exportLease) touch() {
	l.mu.Lock()
	l.lastActive = time.Now()
	l.mu.Unlock()
}

// end takes the lease out of service (its URLs answer 404 from now on) and sets its
// final state. The caller holds the simulator's lock on l.
func (e *exports) end(l *exportLease, state types.HttpNfcLeaseState, fault *types.LocalizedMethodFault) {
	e.mu.Lock()
	delete(e.leases, l.id)
	e.mu.Unlock()
	changes := []types.PropertyChange{{Name: "state", Val: state}}
	if fault != nil {
		changes = append(changes, types.PropertyChange{Name: "error", Val: fault})
	}
	simulator.Map.Update(l, changes)
}

func randomID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	h := hex.EncodeToString(b[:])
	// The shape of vSphere's lease ids: 52xxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
	return "52" + h[2:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ExportVm answers VirtualMachine.ExportVm (routed here by the front handler).
func (h *helper) ExportVm(ctx *simulator.Context, req *types.ExportVm) soap.HasFault {
	body := new(methods.ExportVmBody)
	vm, ok := simulator.Map.Get(h.vm).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: h.vm})
		return body
	}

	var lease *exportLease
	var fault types.BaseMethodFault
	simulator.Map.WithLock(vm, func() { lease, fault = theExports.newLease(vm) })
	if fault != nil {
		body.Fault_ = simulator.Fault("", fault)
		return body
	}
	body.Res = &types.ExportVmResponse{Returnval: lease.Self}
	return body
}

// newLease builds the lease for a powered-off VM: one device URL per virtual disk, in
// device order. The caller holds the simulator's lock on vm.
func (e *exports) newLease(vm *simulator.VirtualMachine) (*exportLease, types.BaseMethodFault) {
	if state := vm.Runtime.PowerState; state != types.VirtualMachinePowerStatePoweredOff {
		return nil, &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOff,
			ExistingState:  state,
		}
	}

	id := randomID()
	l := &exportLease{
		id:         id,
		files:      make(map[string]string),
		keys:       make(map[string]string),
		timeout:    e.timeout,
		lastActive: time.Now(),
	}
	l.Self = types.ManagedObjectReference{Type: "HttpNfcLease", Value: id}

	info := &types.HttpNfcLeaseInfo{
		Lease:        l.Self,
		Entity:       vm.Self,
		LeaseTimeout: int32(e.timeout / time.Second),
	}
	devices := vm.Config.Hardware.Device
	n := 0
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		file, err := diskFile(vm, disk)
		if err != nil {
			return nil, &types.FileNotFound{FileFault: types.FileFault{File: err.Error()}}
		}
		size := int64(0)
		if st, err := os.Stat(file); err == nil {
			size = st.Size()
		} else {
			return nil, &types.FileNotFound{FileFault: types.FileFault{File: file}}
		}
		name := fmt.Sprintf("disk-%d.vmdk", n)
		n++
		key := deviceKey(vm, devices, disk)
		l.files[name] = file
		l.keys[name] = key
		info.DeviceUrl = append(info.DeviceUrl, types.HttpNfcLeaseDeviceUrl{
			Key:       key,
			ImportKey: key,
			// As on vSphere: "*" stands for the host the client reached.
			Url:           "https://*" + nfcPrefix + id + "/" + name,
			SslThumbprint: e.thumbprint,
			Disk:          types.NewBool(true),
			TargetId:      name,
			FileSize:      size,
		})
		info.TotalDiskCapacityInKB += diskCapacity(disk) / 1024
	}

	l.Info = info
	l.State = types.HttpNfcLeaseStateReady
	l.Mode = "pull"
	l.InitializeProgress = 100

	simulator.Map.Put(l)
	e.mu.Lock()
	e.leases[id] = l
	e.mu.Unlock()
	logf("export lease %s for %s (%s): %d disk(s)", id, vm.Name, vm.Self.Value, n)
	return l, nil
}

// deviceKey names a disk the way vSphere's export device URLs do:
// "/vm-42/VirtualLsiLogicController0:1" (controller type and bus, unit number).
func deviceKey(vm *simulator.VirtualMachine, devices []types.BaseVirtualDevice, disk *types.VirtualDisk) string {
	ctrlName, bus := "VirtualController", int32(0)
	for _, d := range devices {
		if d.GetVirtualDevice().Key != disk.ControllerKey {
			continue
		}
		ctrlName = reflect.TypeOf(d).Elem().Name()
		if c, ok := d.(types.BaseVirtualController); ok {
			bus = c.GetVirtualController().BusNumber
		}
	}
	unit := int32(0)
	if disk.UnitNumber != nil {
		unit = *disk.UnitNumber
	}
	return fmt.Sprintf("/%s/%s%d:%d", vm.Self.Value, ctrlName, bus, unit)
}

func diskCapacity(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

// lease returns the live lease with that id, or nil.
func (e *exports) lease(id string) *exportLease {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.leases[id]
}

func (l *exportLease) checkReady() soap.HasFault {
	if l.State == types.HttpNfcLeaseStateReady {
		return nil
	}
	return &faultBody{simulator.Fault("The lease is not ready.", &types.InvalidState{})}
}

// faultBody carries a fault for any method: the encoder only needs Fault().
type faultBody struct{ Fault_ *soap.Fault }

func (b *faultBody) Fault() *soap.Fault { return b.Fault_ }

func (l *exportLease) HttpNfcLeaseProgress(ctx *simulator.Context, req *types.HttpNfcLeaseProgress) soap.HasFault {
	if f := l.checkReady(); f != nil {
		return f
	}
	l.touch()
	simulator.Map.Update(l, []types.PropertyChange{{Name: "transferProgress", Val: req.Percent}})
	return &methods.HttpNfcLeaseProgressBody{Res: new(types.HttpNfcLeaseProgressResponse)}
}

func (l *exportLease) HttpNfcLeaseComplete(ctx *simulator.Context, req *types.HttpNfcLeaseComplete) soap.HasFault {
	if f := l.checkReady(); f != nil {
		return f
	}
	theExports.end(l, types.HttpNfcLeaseStateDone, nil)
	logf("export lease %s completed", l.id)
	return &methods.HttpNfcLeaseCompleteBody{Res: new(types.HttpNfcLeaseCompleteResponse)}
}

func (l *exportLease) HttpNfcLeaseAbort(ctx *simulator.Context, req *types.HttpNfcLeaseAbort) soap.HasFault {
	if f := l.checkReady(); f != nil {
		return f
	}
	var fault *types.LocalizedMethodFault
	if req.Fault != nil {
		fault = req.Fault
	} else {
		fault = &types.LocalizedMethodFault{Fault: &types.RequestCanceled{}, LocalizedMessage: "Operation was canceled"}
	}
	theExports.end(l, types.HttpNfcLeaseStateError, fault)
	logf("export lease %s aborted", l.id)
	return &methods.HttpNfcLeaseAbortBody{Res: new(types.HttpNfcLeaseAbortResponse)}
}

// HttpNfcLeaseGetManifest gives the SHA-1 of each disk file as served.
func (l *exportLease) HttpNfcLeaseGetManifest(ctx *simulator.Context, req *types.HttpNfcLeaseGetManifest) soap.HasFault {
	if f := l.checkReady(); f != nil {
		return f
	}
	l.touch()
	var entries []types.HttpNfcLeaseManifestEntry
	for _, u := range l.Info.DeviceUrl {
		sum, size, err := sha1File(l.files[u.TargetId])
		if err != nil {
			return &faultBody{simulator.Fault(err.Error(), &types.FileFault{File: l.files[u.TargetId]})}
		}
		entries = append(entries, types.HttpNfcLeaseManifestEntry{
			Key:  u.Key,
			Sha1: sum,
			Size: size,
			Disk: true,
		})
	}
	return &methods.HttpNfcLeaseGetManifestBody{Res: &types.HttpNfcLeaseGetManifestResponse{Returnval: entries}}
}

func sha1File(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha1.New()
	n, err := io.Copy(h, f)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

// theExports is the one registry of export leases, for the lease methods that the
// simulator calls without the front handler.
var theExports *exports

// serve answers GET and HEAD for an export lease's device URL
// (/nfc/<lease id>/disk-N.vmdk): the disk's backing file as stored, with Range
// support. It returns false for paths that are not an export lease's, which go to the
// simulator (its import leases, or a 404).
func (e *exports) serve(w http.ResponseWriter, r *http.Request) bool {
	rest := strings.TrimPrefix(r.URL.Path, nfcPrefix)
	parts := strings.Split(rest, "/")
	if len(parts) != 2 {
		return false
	}
	l := e.lease(parts[0])
	if l == nil {
		return false
	}
	path, ok := l.files[parts[1]]
	if !ok {
		http.NotFound(w, r)
		return true
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return true
	}
	l.touch()

	if r.Method == http.MethodGet && e.faults.inject(w, r) {
		return true
	}

	f, err := os.Open(path)
	if err != nil {
		http.NotFound(w, r)
		return true
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return true
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	// ServeContent does Range (206, Content-Range, 416), HEAD and Content-Length.
	http.ServeContent(e.faults.wrap(w, r), r, "", st.ModTime(), &touchReader{f, l})
	return true
}

// touchReader keeps the lease alive while a long download runs.
type touchReader struct {
	*os.File
	l *exportLease
}

func (t *touchReader) Read(p []byte) (int, error) {
	t.l.touch()
	return t.File.Read(p)
}
