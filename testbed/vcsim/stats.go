package main

// Counters of export downloads, so tests can check what a client really did on the
// wire (how many disks it fetched at once, whether it resumed with Range):
//
//	GET  /testbed/fault?stats=1        the counters, as JSON (below)
//	POST /testbed/fault?stats=reset    zero them (nfc_max_active restarts from nfc_active)
//
// /testbed/stats (GET, and POST ?reset=1) answers the same once the front handler routes
// it to the faults (router.go sends only /testbed/fault there today).
//
// A download is a GET of an export lease's device URL. It counts as active from the
// first byte of its 200 or 206 body until that body has been written whole, the
// connection broke (client gone, injected cut) or the handler returned.

import (
	"encoding/json"
	"net/http"
	"sync"
)

const statsPath = "/testbed/stats"

type nfcStats struct {
	mu            sync.Mutex
	active        int
	maxActive     int
	requests      int64
	rangeRequests int64
	statusFaults  int64
	bytes         int64
	completed     int64
	broken        int64
}

type statsState struct {
	NfcActive        int   `json:"nfc_active"`
	NfcMaxActive     int   `json:"nfc_max_active"`
	NfcRequests      int64 `json:"nfc_requests"`
	NfcRangeRequests int64 `json:"nfc_range_requests"`
	NfcStatusFaults  int64 `json:"nfc_status_faults"`
	NfcBytes         int64 `json:"nfc_bytes"`
	NfcCompleted     int64 `json:"nfc_completed"`
	NfcBroken        int64 `json:"nfc_broken"`
	// Export leases still ready (neither completed, aborted nor timed out): what a
	// client that gave up left holding disks on the server. Not reset by reset().
	ExportLeases int `json:"export_leases"`
}

// request counts a download request as it arrives, before any fault applies.
func (s *nfcStats) request(r *http.Request) {
	s.mu.Lock()
	s.requests++
	if r.Header.Get("Range") != "" {
		s.rangeRequests++
	}
	s.mu.Unlock()
}

func (s *nfcStats) statusFault() {
	s.mu.Lock()
	s.statusFaults++
	s.mu.Unlock()
}

// begin marks a body as started.
func (s *nfcStats) begin() {
	s.mu.Lock()
	s.active++
	if s.active > s.maxActive {
		s.maxActive = s.active
	}
	s.mu.Unlock()
}

// end marks a body as over, written whole or not.
func (s *nfcStats) end(whole bool) {
	s.mu.Lock()
	s.active--
	if whole {
		s.completed++
	} else {
		s.broken++
	}
	s.mu.Unlock()
}

func (s *nfcStats) add(n int) {
	s.mu.Lock()
	s.bytes += int64(n)
	s.mu.Unlock()
}

func (s *nfcStats) reset() {
	s.mu.Lock()
	// Downloads still running stay counted as active: their end decrements it.
	s.maxActive = s.active
	s.requests, s.rangeRequests, s.statusFaults = 0, 0, 0
	s.bytes, s.completed, s.broken = 0, 0, 0
	s.mu.Unlock()
}

func (s *nfcStats) state() statsState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return statsState{
		NfcActive:        s.active,
		NfcMaxActive:     s.maxActive,
		NfcRequests:      s.requests,
		NfcRangeRequests: s.rangeRequests,
		NfcStatusFaults:  s.statusFaults,
		NfcBytes:         s.bytes,
		NfcCompleted:     s.completed,
		NfcBroken:        s.broken,
		ExportLeases:     liveLeases(),
	}
}

// liveLeases counts the export leases in service.
func liveLeases() int {
	if theExports == nil {
		return 0
	}
	theExports.mu.Lock()
	defer theExports.mu.Unlock()
	return len(theExports.leases)
}

// serveStats answers GET (the counters) and POST with reset (zero them, then the
// counters). The query key is `stats` on /testbed/fault and `reset` on /testbed/stats.
func (s *nfcStats) serveStats(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	switch r.Method {
	case http.MethodGet:
	case http.MethodPost:
		if q.Get("stats") != "reset" && q.Get("reset") == "" {
			http.Error(w, "POST resets the stats: give stats=reset (or reset=1 on "+statsPath+")",
				http.StatusBadRequest)
			return
		}
		s.reset()
	default:
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s.state())
}
