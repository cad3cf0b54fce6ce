package main

// ---- CloneVM_Task: a clone that takes time and can be cancelled -----------------------
//
// 0.24.2 clones at once, inside the call. vCenter answers CloneVM_Task with a task that
// runs while the disks are copied: state running, cancelable, progress going up, and
// the new VM registered at the end. CancelTask ends it in error RequestCanceled and
// leaves no VM and no files. The front handler does the same: the task "copies" the
// source disks' bytes at the clone rate (knobs.go; default: at once), then makes the
// clone through the simulator (with the fixes below) in one step. A clone that does not
// fit the target datastore's free space fails with NoDiskSpace before anything is made.
//
// The task posts a VmBeingClonedEvent (destName: the clone's name) whose chainId is the
// task's info.eventChainId, as vCenter does: a client finds whose clone a running task
// makes from its events. The clone gets spec.config.annotation (0.24.2 drops it).
//
// 0.24.2's own clone also hands the source VM's device objects to the clone and blanks
// their backing file names so that CreateVM makes new (empty) disks: the SOURCE then
// points at the clone's disks, and both share NIC objects and MACs. The clone here gives
// the simulator deep copies of the source's devices to mutate, puts the originals back
// afterwards, copies the disk contents into the clone's own files and gives the clone
// new MACs (manual ones are kept), as vCenter does.

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// cloneJob is a running clone's cancel request.
type cloneJob struct {
	cancel chan struct{}
	once   sync.Once
}

func (j *cloneJob) requestCancel() { j.once.Do(func() { close(j.cancel) }) }

var cloneJobs sync.Map // task moref value -> *cloneJob

// internalContext is a simulator call context for calls the test bed makes itself, on
// behalf of caller (whose lock the caller of the method holds).
func internalContext(caller types.ManagedObjectReference) *simulator.Context {
	return &simulator.Context{
		Context: context.Background(),
		Session: &simulator.Session{
			UserSession: types.UserSession{UserName: "vcsim"},
			Registry:    simulator.NewRegistry(),
		},
		Caller: &caller,
		Map:    simulator.Map,
	}
}

func (f *front) cloneVM(w http.ResponseWriter, r *http.Request, body []byte, req *types.CloneVM_Task) {
	vm := vmByRef(req.This)
	if vm == nil || simulator.Map.IsESX() {
		f.forward(w, r, body)
		return
	}
	job := &cloneJob{cancel: make(chan struct{})}
	task := simulator.CreateTask(vm, "cloneVm", func(t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return runClone(t, job, vm, req)
	})
	chain := postBeingCloned(vm, req)
	simulator.Map.WithLock(task, func() {
		task.Info.Name = "vim.VirtualMachine.clone" // vCenter names the vmodl method
		task.Info.DescriptionId = "VirtualMachine.clone"
		task.Info.Cancelable = true
		task.Info.EventChainId = chain
	})
	cloneJobs.Store(task.Self.Value, job)
	go func() {
		task.Run()
		cloneJobs.Delete(task.Self.Value)
	}()
	writeSOAP(w, http.StatusOK, fmt.Sprintf(
		`<CloneVM_TaskResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></CloneVM_TaskResponse>`,
		task.Self.Value))
}

// postBeingCloned posts the task's VmBeingClonedEvent and returns its chain id.
func postBeingCloned(vm *simulator.VirtualMachine, req *types.CloneVM_Task) int32 {
	ev := &types.VmBeingClonedEvent{DestName: req.Name}
	simulator.Map.WithLock(vm, func() {
		ev.Vm = &types.VmEventArgument{EntityEventArgument: types.EntityEventArgument{Name: vm.Name}, Vm: vm.Self}
		if vm.Runtime.Host != nil {
			if h, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem); ok {
				ev.Host = &types.HostEventArgument{EntityEventArgument: types.EntityEventArgument{Name: h.Name}, Host: h.Self}
				ev.DestHost = *ev.Host
			}
		}
	})
	if dc := datacenterOf(vm.Self); dc != nil {
		ev.Datacenter = &types.DatacenterEventArgument{EntityEventArgument: types.EntityEventArgument{Name: dc.Name}, Datacenter: dc.Self}
	}
	ev.DestFolder = types.FolderEventArgument{Folder: req.Folder}
	em := simulator.Map.EventManager()
	ctx := internalContext(em.Self)
	simulator.Map.WithLock(em, func() {
		em.PostEvent(ctx, &types.PostEvent{EventToPost: ev})
	})
	return ev.ChainId
}

// sourceBytes is what a clone copies: the size of the source disks' files.
func sourceBytes(vm *simulator.VirtualMachine) int64 {
	var files []string
	simulator.Map.WithLock(vm, func() {
		for _, d := range vm.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok {
				if file, err := diskFile(vm, disk); err == nil {
					files = append(files, diskFileSet(file)...)
				}
			}
		}
	})
	var total int64
	for _, f := range files {
		if size, _, err := fileSetStat([]string{f}); err == nil {
			total += size
		}
	}
	return total
}

// cloneTarget is the datastore the clone goes to: the spec's, else the source's first.
func cloneTarget(vm *simulator.VirtualMachine, req *types.CloneVM_Task) *simulator.Datastore {
	var ref *types.ManagedObjectReference
	if req.Spec.Location.Datastore != nil {
		ref = req.Spec.Location.Datastore
	} else {
		simulator.Map.WithLock(vm, func() {
			if len(vm.Datastore) > 0 {
				r := vm.Datastore[0]
				ref = &r
			}
		})
	}
	if ref == nil {
		return nil
	}
	ds, _ := simulator.Map.Get(*ref).(*simulator.Datastore)
	return ds
}

func runClone(t *simulator.Task, job *cloneJob, vm *simulator.VirtualMachine, req *types.CloneVM_Task) (types.AnyType, types.BaseMethodFault) {
	bytes := sourceBytes(vm)
	if ds := cloneTarget(vm, req); ds != nil {
		if _, free := space(ds); free < bytes {
			return nil, &types.NoDiskSpace{
				FileFault: types.FileFault{File: fmt.Sprintf("[%s] %s", ds.Name, req.Name)},
				Datastore: ds.Name,
			}
		}
	}

	duration := knobs.cloneDuration(bytes)
	start := time.Now()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		elapsed := time.Since(start)
		if elapsed >= duration {
			break
		}
		select {
		case <-job.cancel:
			simulator.Map.Update(t, []types.PropertyChange{{Name: "info.cancelled", Val: true}})
			return nil, &types.RequestCanceled{}
		case <-tick.C:
			progress := int32(time.Since(start) * 100 / duration)
			if progress > 99 {
				progress = 99
			}
			simulator.Map.Update(t, []types.PropertyChange{{Name: "info.progress", Val: progress}})
		}
	}
	// The copy is done; registering the VM cannot be cancelled any more.
	select {
	case <-job.cancel:
		simulator.Map.Update(t, []types.PropertyChange{{Name: "info.cancelled", Val: true}})
		return nil, &types.RequestCanceled{}
	default:
	}
	simulator.Map.Update(t, []types.PropertyChange{
		{Name: "info.cancelable", Val: false},
		{Name: "info.progress", Val: int32(100)},
	})
	return cloneNow(vm, req)
}

// cloneNow makes the clone through the simulator, with the fixes above.
func cloneNow(vm *simulator.VirtualMachine, req *types.CloneVM_Task) (types.AnyType, types.BaseMethodFault) {
	var orig []types.BaseVirtualDevice
	var res soap.HasFault
	simulator.Map.WithLock(vm, func() {
		orig = vm.Config.Hardware.Device
		vm.Config.Hardware.Device = deepCopy(orig).([]types.BaseVirtualDevice)
		res = vm.CloneVMTask(internalContext(vm.Self), req)
		vm.Config.Hardware.Device = orig
	})
	body, ok := res.(*methods.CloneVM_TaskBody)
	if !ok || body.Res == nil {
		if res != nil && res.Fault() != nil {
			if f, ok := res.Fault().Detail.Fault.(types.BaseMethodFault); ok {
				return nil, f
			}
		}
		return nil, &types.SystemError{Reason: "clone failed"}
	}
	inner, _ := simulator.Map.Get(body.Res.Returnval).(*simulator.Task)
	if inner == nil {
		return nil, &types.SystemError{Reason: "clone task vanished"}
	}
	// The simulator's own task is an implementation detail: the client's task is ours.
	dropTask(inner)
	if inner.Info.Error != nil {
		return nil, inner.Info.Error.Fault
	}
	ref, _ := inner.Info.Result.(types.ManagedObjectReference)
	clone := vmByRef(ref)
	if clone == nil {
		return nil, &types.SystemError{Reason: "clone VM vanished"}
	}
	if err := copyCloneDisks(vm, orig, clone); err != nil {
		logf("clone %s: copying disks: %s", clone.Name, err)
	}
	macMu.Lock()
	regenerateMACs(clone, true, func(string) bool { return false })
	macMu.Unlock()
	if req.Spec.Config != nil && req.Spec.Config.Annotation != "" {
		simulator.Map.WithLock(clone, func() {
			clone.Config.Annotation = req.Spec.Config.Annotation
			clone.Summary.Config.Annotation = req.Spec.Config.Annotation
		})
	}
	stampVM(clone, true)
	return ref, nil
}

// dropTask removes a finished task from the registry and TaskManager.recentTask.
func dropTask(task *simulator.Task) {
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	if content.TaskManager != nil {
		if tm, ok := simulator.Map.Get(*content.TaskManager).(*simulator.TaskManager); ok {
			tm.Lock()
			var kept []types.ManagedObjectReference
			for _, ref := range tm.RecentTask {
				if ref != task.Self {
					kept = append(kept, ref)
				}
			}
			simulator.Map.Update(tm, []types.PropertyChange{{Name: "recentTask", Val: kept}})
			tm.Unlock()
		}
	}
	simulator.Map.Remove(task.Self)
}

// CancelTask asks a running clone to stop. vCenter answers at once and ends the task
// later; a finished task gives InvalidState, one that cannot be cancelled NotSupported.
func (h *helper) CancelTask(ctx *simulator.Context, req *types.CancelTask) soap.HasFault {
	task, ok := simulator.Map.Get(h.vm).(*simulator.Task)
	if !ok {
		return &faultBody{simulator.Fault("", &types.ManagedObjectNotFound{Obj: h.vm})}
	}
	var state types.TaskInfoState
	var cancelable bool
	simulator.Map.WithLock(task, func() { state, cancelable = task.Info.State, task.Info.Cancelable })
	if state == types.TaskInfoStateSuccess || state == types.TaskInfoStateError {
		return &faultBody{simulator.Fault("The task has already finished.", &types.InvalidState{})}
	}
	job, found := cloneJobs.Load(h.vm.Value)
	if !found || !cancelable {
		return &faultBody{simulator.Fault("The task cannot be cancelled.", &types.NotSupported{})}
	}
	job.(*cloneJob).requestCancel()
	return &methods.CancelTaskBody{Res: &types.CancelTaskResponse{}}
}
