package main

// Knobs a test turns, on the simulator's own listener:
//
//	POST /testbed/knob?clone_rate_kbps=KIB      clones copy at KIB KiB/s (0: at once)
//	POST /testbed/knob?clone_min_ms=MS          every clone takes at least MS ms
//	POST /testbed/knob?datastore=NAME&capacity_bytes=N
//	     the datastore reports capacity N and free space N minus what its files take
//	     (0: its file system's again)
//	GET  /testbed/knob                          the knobs as JSON
//
// Knobs stay until changed (faults.go's faults count down instead). -clone-rate-kbps and
// -clone-min-ms set the clone knobs at start.

import (
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"
)

const knobPath = "/testbed/knob"

type knobSet struct {
	mu        sync.Mutex
	cloneRate int64 // bytes per second, 0: no limit
	cloneMin  time.Duration
}

var knobs = &knobSet{}

type knobState struct {
	CloneRateKbps int64            `json:"clone_rate_kbps"`
	CloneMinMs    int64            `json:"clone_min_ms"`
	Capacities    map[string]int64 `json:"capacities"`
}

// cloneDuration is how long a clone of `bytes` takes.
func (k *knobSet) cloneDuration(bytes int64) time.Duration {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.cloneMin
	if k.cloneRate > 0 {
		if r := time.Duration(float64(bytes) / float64(k.cloneRate) * float64(time.Second)); r > d {
			d = r
		}
	}
	return d
}

func (k *knobSet) set(rateKbps, minMs int64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if rateKbps >= 0 {
		k.cloneRate = rateKbps * 1024
	}
	if minMs >= 0 {
		k.cloneMin = time.Duration(minMs) * time.Millisecond
	}
}

func (k *knobSet) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if r.Method == http.MethodPost {
		q := r.URL.Query()
		count := func(name string) (int64, bool) {
			v := q.Get(name)
			if v == "" {
				return -1, true
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				http.Error(w, name+": not a non-negative number", http.StatusBadRequest)
				return 0, false
			}
			return n, true
		}
		rate, ok1 := count("clone_rate_kbps")
		minMs, ok2 := count("clone_min_ms")
		capacity, ok3 := count("capacity_bytes")
		if !ok1 || !ok2 || !ok3 {
			return
		}
		if (capacity >= 0) != (q.Get("datastore") != "") {
			http.Error(w, "datastore and capacity_bytes go together", http.StatusBadRequest)
			return
		}
		if capacity >= 0 {
			if err := setCapacity(q.Get("datastore"), capacity); err != nil {
				http.Error(w, err.Error(), http.StatusNotFound)
				return
			}
		}
		k.set(rate, minMs)
	}
	k.mu.Lock()
	state := knobState{CloneRateKbps: k.cloneRate / 1024, CloneMinMs: int64(k.cloneMin / time.Millisecond)}
	k.mu.Unlock()
	capacityMu.Lock()
	state.Capacities = map[string]int64{}
	for name, c := range capacities {
		state.Capacities[name] = c
	}
	capacityMu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(state)
}
