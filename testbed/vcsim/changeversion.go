package main

// ---- config.changeVersion ----------------------------------------------------------
//
// vCenter gives every VM a config.changeVersion, a timestamp that changes with each
// configuration change; 0.24.2 leaves it empty. v2k keys resumable exports on it, so
// the front handler stamps each VM that has none before properties are read, and
// stamps a VM again after ReconfigVM_Task changed it.

import (
	"net/http"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var stampMu sync.Mutex
var lastStamp time.Time

// nextStamp is a vCenter-style changeVersion, later than every one handed out before.
func nextStamp() string {
	stampMu.Lock()
	defer stampMu.Unlock()
	now := time.Now().UTC()
	if !now.After(lastStamp) {
		now = lastStamp.Add(time.Microsecond)
	}
	lastStamp = now
	return now.Format("2006-01-02T15:04:05.000000Z")
}

// stampVM sets the VM's changeVersion; only when it has none unless always.
func stampVM(vm *simulator.VirtualMachine, always bool) {
	simulator.Map.WithLock(vm, func() {
		if vm.Config != nil && (always || vm.Config.ChangeVersion == "") {
			vm.Config.ChangeVersion = nextStamp()
		}
	})
}

// stampUnversioned gives every VM without a changeVersion one.
func stampUnversioned() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		stampVM(e.(*simulator.VirtualMachine), false)
	}
}

// reconfigure runs ReconfigVM_Task and then moves the VM to a new changeVersion.
func (f *front) reconfigure(w http.ResponseWriter, r *http.Request, body []byte, ref types.ManagedObjectReference) {
	rec := f.record(r, body)
	if vm := vmByRef(ref); vm != nil {
		stampVM(vm, true)
	}
	replay(w, rec)
}
