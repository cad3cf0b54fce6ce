package main

// ---- HostDatastoreBrowser.SearchDatastore(SubFolders)_Task -----------------------------
//
// 0.24.2 gives each file's own size and modification time, but:
//   - without a matchPattern it matches nothing; vSphere then matches every file;
//   - it lists a disk's data file (X-flat.vmdk) beside its descriptor, and gives the
//     descriptor its own few hundred bytes. vSphere's browser shows a disk as one file,
//     X.vmdk, whose size is the disk's files together; its modification time here is the
//     latest of them, so a write into the data file shows on X.vmdk.

import (
	"net/http"
	"path"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func (f *front) searchDatastore(w http.ResponseWriter, r *http.Request, spec **types.HostDatastoreBrowserSearchSpec, encode func() []byte) {
	if *spec == nil {
		*spec = &types.HostDatastoreBrowserSearchSpec{}
	}
	if len((*spec).MatchPattern) == 0 {
		(*spec).MatchPattern = []string{"*"}
	}
	details := (*spec).Details
	rec := f.record(r, encode())
	if task := taskOf(rec.Body.Bytes()); task != nil {
		simulator.Map.WithLock(task, func() {
			switch res := task.Info.Result.(type) {
			case types.HostDatastoreBrowserSearchResults:
				mergeDiskFiles(&res, details)
				task.Info.Result = res
			case types.ArrayOfHostDatastoreBrowserSearchResults:
				for i := range res.HostDatastoreBrowserSearchResults {
					mergeDiskFiles(&res.HostDatastoreBrowserSearchResults[i], details)
				}
				task.Info.Result = res
			}
		})
	}
	replay(w, rec)
}

// taskOf is the task a SOAP response returns, if it names one.
func taskOf(response []byte) *simulator.Task {
	m := taskReturnval.FindSubmatch(response)
	if m == nil {
		return nil
	}
	task, _ := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(m[1])}).(*simulator.Task)
	return task
}

// mergeDiskFiles shows each disk of one folder's results as its descriptor alone, with
// the size and latest modification time of all its files.
func mergeDiskFiles(res *types.HostDatastoreBrowserSearchResults, details *types.FileQueryFlags) {
	if res.Datastore == nil {
		return
	}
	ds, ok := simulator.Map.Get(*res.Datastore).(*simulator.Datastore)
	if !ok {
		return
	}
	var p object.DatastorePath
	if !p.FromString(res.FolderPath) {
		return
	}
	folder := path.Join(ds.Info.GetDatastoreInfo().Url, p.Path)

	hidden := map[string]bool{}
	for _, fi := range res.File {
		name := fi.GetFileInfo().Path
		if !strings.HasSuffix(name, ".vmdk") || strings.HasSuffix(name, "-flat.vmdk") {
			continue
		}
		files := diskFileSet(path.Join(folder, name))
		for _, extra := range files[1:] {
			if path.Dir(extra) == folder {
				hidden[path.Base(extra)] = true
			}
		}
		size, mtime, err := fileSetStat(files)
		if err != nil {
			continue
		}
		info := fi.GetFileInfo()
		if details != nil && details.FileSize {
			info.FileSize = size
		}
		if details != nil && details.Modification {
			t := mtime
			info.Modification = &t
		}
	}
	kept := res.File[:0]
	for _, fi := range res.File {
		if !hidden[fi.GetFileInfo().Path] {
			kept = append(kept, fi)
		}
	}
	res.File = kept
}
