package main

// Fault injection for tests, on the simulator's own listener:
//
//	POST /testbed/fault?nfc_cut_after=BYTES&times=N  the next N export downloads (GET)
//	     close the connection abruptly after BYTES body bytes
//	POST /testbed/fault?nfc_status=CODE&times=N      the next N export downloads answer CODE
//	POST /testbed/fault?nfc_delay_ms=MS&times=N      the next N export downloads wait MS first
//	POST /testbed/fault?clear=1                      no more faults
//	GET  /testbed/fault                              the faults still armed, as JSON
//
// times defaults to 1. Each armed fault counts down on its own.

import (
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"
)

const faultPath = "/testbed/fault"

type faults struct {
	mu         sync.Mutex
	cutAfter   int64
	cutTimes   int
	status     int
	statusLeft int
	delay      time.Duration
	delayLeft  int
}

func newFaults() *faults { return &faults{} }

type faultState struct {
	NfcCutAfter   int64 `json:"nfc_cut_after"`
	NfcCutTimes   int   `json:"nfc_cut_times"`
	NfcStatus     int   `json:"nfc_status"`
	NfcStatusLeft int   `json:"nfc_status_times"`
	NfcDelayMs    int64 `json:"nfc_delay_ms"`
	NfcDelayLeft  int   `json:"nfc_delay_times"`
}

func (f *faults) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	q := r.URL.Query()
	if r.Method == http.MethodPost {
		times := 1
		if v := q.Get("times"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				http.Error(w, "times: not a count", http.StatusBadRequest)
				return
			}
			times = n
		}
		f.mu.Lock()
		err := f.arm(q.Get, times)
		f.mu.Unlock()
		if err != "" {
			http.Error(w, err, http.StatusBadRequest)
			return
		}
	}
	f.mu.Lock()
	state := faultState{
		f.cutAfter, f.cutTimes, f.status, f.statusLeft,
		int64(f.delay / time.Millisecond), f.delayLeft,
	}
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(state)
}

// arm sets the faults named by the query; the caller holds f.mu.
func (f *faults) arm(get func(string) string, times int) string {
	if get("clear") != "" {
		f.cutAfter, f.cutTimes = 0, 0
		f.status, f.statusLeft = 0, 0
		f.delay, f.delayLeft = 0, 0
	}
	if v := get("nfc_cut_after"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return "nfc_cut_after: not a byte count"
		}
		f.cutAfter, f.cutTimes = n, times
	}
	if v := get("nfc_status"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 100 || n > 599 {
			return "nfc_status: not an HTTP status"
		}
		f.status, f.statusLeft = n, times
	}
	if v := get("nfc_delay_ms"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return "nfc_delay_ms: not a duration"
		}
		f.delay, f.delayLeft = time.Duration(n)*time.Millisecond, times
	}
	return ""
}

// inject applies the delay and status faults to a download; it returns true when it
// answered the request itself.
func (f *faults) inject(w http.ResponseWriter, r *http.Request) bool {
	f.mu.Lock()
	var delay time.Duration
	if f.delayLeft > 0 {
		f.delayLeft--
		delay = f.delay
	}
	status := 0
	if f.statusLeft > 0 {
		f.statusLeft--
		status = f.status
	}
	f.mu.Unlock()

	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return true
		}
	}
	if status != 0 {
		http.Error(w, "injected fault", status)
		return true
	}
	return false
}

// wrap returns w, or for a download that an armed cut applies to, a writer that stops
// after the given number of body bytes and drops the connection.
func (f *faults) wrap(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if r.Method != http.MethodGet {
		return w
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cutTimes <= 0 {
		return w
	}
	f.cutTimes--
	return &cutWriter{ResponseWriter: w, left: f.cutAfter}
}

type cutWriter struct {
	http.ResponseWriter
	left int64
}

func (c *cutWriter) Write(p []byte) (int, error) {
	if int64(len(p)) <= c.left {
		n, err := c.ResponseWriter.Write(p)
		c.left -= int64(n)
		return n, err
	}
	_, _ = c.ResponseWriter.Write(p[:c.left])
	if fl, ok := c.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
	logf("fault: cutting a download")
	// net/http closes the connection without a log line for this panic: the client
	// sees a body shorter than its Content-Length.
	panic(http.ErrAbortHandler)
}
