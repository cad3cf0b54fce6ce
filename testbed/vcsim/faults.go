package main

// Fault injection for tests, on the simulator's own listener:
//
//	POST /testbed/fault?nfc_cut_after=BYTES&times=N  the next N export downloads (GET)
//	     close the connection abruptly after BYTES body bytes
//	POST /testbed/fault?nfc_status=CODE&times=N      the next N export downloads answer CODE
//	POST /testbed/fault?nfc_delay_ms=MS&times=N      the next N export downloads wait MS first
//	POST /testbed/fault?nfc_rate_kbps=KIB&times=N    the next N export downloads send their
//	     body at KIB KiB (1024 bytes) per second, so that parallel downloads overlap
//	POST /testbed/fault?clear=1                      no more faults
//	GET  /testbed/fault                              the faults still armed, as JSON
//
// times defaults to 1. Each armed fault counts down on its own. A status fault answers
// before the body, so it does not use up a cut or a rate; a delay comes before all.
//
// The same handler serves the download counters (stats.go): GET ?stats=1, POST
// ?stats=reset.

import (
	"context"
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
	rate       int64 // bytes per second
	rateLeft   int

	stats *nfcStats
}

func newFaults() *faults { return &faults{stats: &nfcStats{}} }

type faultState struct {
	NfcCutAfter   int64 `json:"nfc_cut_after"`
	NfcCutTimes   int   `json:"nfc_cut_times"`
	NfcStatus     int   `json:"nfc_status"`
	NfcStatusLeft int   `json:"nfc_status_times"`
	NfcDelayMs    int64 `json:"nfc_delay_ms"`
	NfcDelayLeft  int   `json:"nfc_delay_times"`
	NfcRateKbps   int64 `json:"nfc_rate_kbps"`
	NfcRateLeft   int   `json:"nfc_rate_times"`
}

func (f *faults) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if r.URL.Path == statsPath || q.Get("stats") != "" {
		f.stats.serveStats(w, r)
		return
	}
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
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
		f.rate / 1024, f.rateLeft,
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
		f.rate, f.rateLeft = 0, 0
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
	if v := get("nfc_rate_kbps"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 || n > 1<<30 {
			return "nfc_rate_kbps: not a positive rate in KiB/s"
		}
		f.rate, f.rateLeft = n*1024, times
	}
	return ""
}

// inject counts a download request and applies the delay and status faults to it; it
// returns true when it answered the request itself.
func (f *faults) inject(w http.ResponseWriter, r *http.Request) bool {
	f.stats.request(r)
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
		f.stats.statusFault()
		http.Error(w, "injected fault", status)
		return true
	}
	return false
}

// wrap returns the writer a download's response goes through: it counts the body in
// the stats, and applies an armed cut (stop after the given number of body bytes and
// drop the connection) and an armed rate.
func (f *faults) wrap(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if r.Method != http.MethodGet {
		return w
	}
	nw := &nfcWriter{ResponseWriter: w, ctx: r.Context(), stats: f.stats, length: -1}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cutTimes > 0 {
		f.cutTimes--
		nw.cut, nw.left = true, f.cutAfter
	}
	if f.rateLeft > 0 {
		f.rateLeft--
		nw.rate = f.rate
	}
	return nw
}

// nfcWriter is the ResponseWriter of one download.
type nfcWriter struct {
	http.ResponseWriter
	ctx   context.Context
	stats *nfcStats

	cut  bool
	left int64 // body bytes before the cut
	rate int64 // bytes per second; 0: as fast as it goes

	status  int
	started bool
	start   time.Time
	sent    int64
	length  int64 // Content-Length of the body, -1 unknown
	once    sync.Once
}

func (n *nfcWriter) WriteHeader(code int) {
	if n.status == 0 {
		n.status = code
	}
	n.ResponseWriter.WriteHeader(code)
}

// finish ends the download in the stats, once.
func (n *nfcWriter) finish(whole bool) {
	n.once.Do(func() { n.stats.end(whole) })
}

func (n *nfcWriter) begin() {
	n.started = true
	n.start = time.Now()
	if v, err := strconv.ParseInt(n.Header().Get("Content-Length"), 10, 64); err == nil {
		n.length = v
	}
	n.stats.begin()
	// The request's context ends when the handler returns or the client goes away:
	// whatever way the body ends, it stops counting as active.
	go func() {
		<-n.ctx.Done()
		n.finish(false)
	}()
}

func (n *nfcWriter) flush() {
	if fl, ok := n.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

// piece is how much to write before pacing: about 20 ms worth at the rate.
func (n *nfcWriter) piece() int {
	if n.rate == 0 {
		return 1 << 30
	}
	p := n.rate / 50
	if p < 1024 {
		p = 1024
	}
	if p > 32<<10 {
		p = 32 << 10
	}
	return int(p)
}

// pace sleeps until the bytes sent so far are due at the rate.
func (n *nfcWriter) pace() error {
	due := n.start.Add(time.Duration(float64(n.sent) / float64(n.rate) * float64(time.Second)))
	wait := time.Until(due)
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-n.ctx.Done():
		return n.ctx.Err()
	}
}

func (n *nfcWriter) Write(p []byte) (int, error) {
	if n.status == 0 {
		n.status = http.StatusOK
	}
	body := n.status == http.StatusOK || n.status == http.StatusPartialContent
	if !body || len(p) == 0 {
		// An error page, not a disk: not counted.
		return n.ResponseWriter.Write(p)
	}
	if !n.started {
		n.begin()
	}
	written := 0
	for len(p) > 0 {
		chunk := p
		if len(chunk) > n.piece() {
			chunk = chunk[:n.piece()]
		}
		// Pace before a piece, not after: the last piece goes out without a wait.
		if n.rate > 0 {
			if err := n.pace(); err != nil {
				n.finish(false)
				return written, err
			}
		}
		if n.cut && int64(len(chunk)) > n.left {
			m, _ := n.ResponseWriter.Write(chunk[:n.left])
			n.sent += int64(m)
			n.stats.add(m)
			n.flush()
			n.finish(false)
			logf("fault: cutting a download after %d bytes", n.sent)
			// net/http closes the connection without a log line for this panic: the
			// client sees a body shorter than its Content-Length.
			panic(http.ErrAbortHandler)
		}
		m, err := n.ResponseWriter.Write(chunk)
		written += m
		n.sent += int64(m)
		n.left -= int64(m)
		n.stats.add(m)
		if err != nil {
			n.finish(false)
			return written, err
		}
		p = p[m:]
		if n.rate > 0 {
			n.flush()
		}
	}
	if n.length >= 0 && n.sent >= n.length {
		n.finish(true)
	}
	return written, nil
}
