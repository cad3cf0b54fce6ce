package main

// Facts about data that vCenter reports and 0.24.2 does not, or gets wrong:
//
//   - ServiceContent.about.instanceUuid: 0.24.2's vCenter model gives every simulator the
//     same fixed one; here it comes from -instance-uuid (or is random per process).
//   - Datastore summary.capacity/freeSpace: 0.24.2 reads them from the host's file system
//     once at start. Here they are read again before properties are read, from the file
//     system or, for a datastore made "small" with a knob, as the set capacity minus the
//     bytes its files take.
//   - Changed Block Tracking: with config.changeTrackingEnabled, each disk's
//     backing.changeId is set, in vSphere's format ("52 4b ... 8e 3f/12"): a random
//     tracking epoch (new when tracking is turned on again) and a sequence number that
//     goes up whenever the disk's files change (size or modification time).

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// setInstanceUUID sets the about.instanceUuid that clients read from the ServiceContent.
func setInstanceUUID(id string) {
	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	si.Content.About.InstanceUuid = id
}

// randomUUID is a random (version 4) UUID.
func randomUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// refreshFacts brings what property reads show up to date with the files on disk.
func refreshFacts() {
	stampUnversioned()
	refreshDatastores()
	refreshChangeIDs()
	fixTaskEntities()
}

// fixTaskEntities clears info.entity of tasks that name a manager (0.24.2's
// VirtualDiskManager tasks): TaskInfo.entity is a ManagedEntity, and a client that
// reads such a task's info (pyvmomi does, from TaskManager.recentTask) fails to decode
// it. vCenter leaves entity unset for them.
func fixTaskEntities() {
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	if content.TaskManager == nil {
		return
	}
	tm, ok := simulator.Map.Get(*content.TaskManager).(*simulator.TaskManager)
	if !ok {
		return
	}
	tm.Lock()
	recent := append([]types.ManagedObjectReference(nil), tm.RecentTask...)
	tm.Unlock()
	for _, ref := range recent {
		task, ok := simulator.Map.Get(ref).(*simulator.Task)
		if !ok {
			continue
		}
		simulator.Map.WithLock(task, func() {
			if task.Info.Entity == nil {
				return
			}
			if _, entity := simulator.Map.Get(*task.Info.Entity).(mo.Entity); !entity {
				task.Info.Entity = nil
				task.Info.EntityName = ""
			}
		})
	}
}

// ---- datastore space -----------------------------------------------------------------

var capacityMu sync.Mutex
var capacities = map[string]int64{} // datastore name -> capacity set by a knob, bytes

// setCapacity makes a datastore report the given capacity (0: its file system's again).
func setCapacity(name string, bytes int64) error {
	found := false
	for _, e := range simulator.Map.All("Datastore") {
		if e.(*simulator.Datastore).Name == name {
			found = true
		}
	}
	if !found {
		return fmt.Errorf("no datastore %q", name)
	}
	capacityMu.Lock()
	defer capacityMu.Unlock()
	if bytes <= 0 {
		delete(capacities, name)
	} else {
		capacities[name] = bytes
	}
	return nil
}

func capacityOf(name string) (int64, bool) {
	capacityMu.Lock()
	defer capacityMu.Unlock()
	c, ok := capacities[name]
	return c, ok
}

// dirUsage is the space the files below dir take (allocated blocks, as a thin disk on
// VMFS counts).
func dirUsage(dir string) int64 {
	var used int64
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			used += st.Blocks * 512
		} else {
			used += info.Size()
		}
		return nil
	})
	return used
}

// space is a datastore's capacity and free space now.
func space(ds *simulator.Datastore) (capacity, free int64) {
	dir := ds.Info.GetDatastoreInfo().Url
	if c, ok := capacityOf(ds.Name); ok {
		free = c - dirUsage(dir)
		if free < 0 {
			free = 0
		}
		return c, free
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return ds.Summary.Capacity, ds.Summary.FreeSpace
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize
}

func refreshDatastores() {
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		capacity, free := space(ds)
		simulator.Map.WithLock(ds, func() {
			ds.Summary.Capacity = capacity
			ds.Summary.FreeSpace = free
			info := ds.Info.GetDatastoreInfo()
			info.FreeSpace = free
			info.MaxFileSize = free
			info.MaxMemoryFileSize = free
			now := time.Now()
			info.Timestamp = &now
			if vmfs, ok := ds.Info.(*types.VmfsDatastoreInfo); ok && vmfs.Vmfs != nil {
				vmfs.Vmfs.Capacity = capacity
			}
		})
	}
}

// ---- the files of a disk ---------------------------------------------------------------

// diskFileSet is a disk's descriptor and the files that hold its data: the extents a
// text descriptor names, or for a self-contained VMDK its X-flat.vmdk sibling if any
// (the placeholder that fixes.go makes). The descriptor comes first.
func diskFileSet(descriptor string) []string {
	files := []string{descriptor}
	text, err := readSmallText(descriptor)
	if err == nil && text != nil {
		for _, line := range strings.Split(string(text), "\n") {
			if m := extentLine.FindStringSubmatch(strings.TrimRight(line, "\r")); m != nil {
				files = append(files, filepath.Join(filepath.Dir(descriptor), m[2]))
			}
		}
		return files
	}
	flat := strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
	if _, err := os.Stat(flat); err == nil && flat != descriptor {
		files = append(files, flat)
	}
	return files
}

// fileSetStat is the total size and the latest modification time of files.
func fileSetStat(files []string) (size int64, mtime time.Time, err error) {
	for _, f := range files {
		info, e := os.Stat(f)
		if e != nil {
			return 0, time.Time{}, e
		}
		size += info.Size()
		if info.ModTime().After(mtime) {
			mtime = info.ModTime()
		}
	}
	return size, mtime, nil
}

// ---- Changed Block Tracking ------------------------------------------------------------

type cbtState struct {
	epoch string // "52 4b ... 8e 3f"
	seq   int
	size  int64
	mtime time.Time
}

var cbtMu sync.Mutex
var cbtStates = map[string]*cbtState{} // "vm-42/2000" -> state

func newEpoch() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[0] = 0x52 // vSphere's change ids start with 52, as its UUIDs in that form do
	parts := make([]string, 16)
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// changeID is the disk's current change id, bumped when its files changed since the
// last look.
func changeID(key string, size int64, mtime time.Time) string {
	cbtMu.Lock()
	defer cbtMu.Unlock()
	s := cbtStates[key]
	if s == nil {
		s = &cbtState{epoch: newEpoch(), seq: 1, size: size, mtime: mtime}
		cbtStates[key] = s
	} else if s.size != size || !s.mtime.Equal(mtime) {
		s.seq++
		s.size, s.mtime = size, mtime
	}
	return fmt.Sprintf("%s/%d", s.epoch, s.seq)
}

func forgetChangeIDs(vm string) {
	cbtMu.Lock()
	defer cbtMu.Unlock()
	for k := range cbtStates {
		if strings.HasPrefix(k, vm+"/") {
			delete(cbtStates, k)
		}
	}
}

// refreshChangeIDs sets (or clears) backing.changeId of every VM's disks.
func refreshChangeIDs() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		type job struct {
			backing *types.VirtualDiskFlatVer2BackingInfo
			key     string
			files   []string
		}
		var jobs []job
		enabled := false
		simulator.Map.WithLock(vm, func() {
			if vm.Config == nil {
				return
			}
			enabled = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
			for _, d := range vm.Config.Hardware.Device {
				disk, ok := d.(*types.VirtualDisk)
				if !ok {
					continue
				}
				b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				if !ok {
					continue
				}
				if !enabled {
					b.ChangeId = ""
					continue
				}
				file, err := diskFile(vm, disk)
				if err != nil {
					continue
				}
				jobs = append(jobs, job{b, fmt.Sprintf("%s/%d", vm.Self.Value, disk.Key), diskFileSet(file)})
			}
		})
		if !enabled {
			forgetChangeIDs(vm.Self.Value)
			continue
		}
		for _, j := range jobs {
			size, mtime, err := fileSetStat(j.files)
			if err != nil {
				continue
			}
			id := changeID(j.key, size, mtime)
			simulator.Map.WithLock(vm, func() { j.backing.ChangeId = id })
		}
	}
}
