package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// front is the HTTP handler in front of the simulator's mux. It answers what 0.24.2
// lacks and rewrites or post-processes the SOAP calls that 0.24.2 gets wrong; every
// other request goes to the simulator unchanged.
type front struct {
	sim     http.Handler
	exports *exports
	faults  *faults
}

func newFront(sim http.Handler, leaseTimeout time.Duration) *front {
	f := &front{sim: sim, faults: newFaults()}
	f.exports = newExports(leaseTimeout, f.faults)
	theExports = f.exports
	return f
}

func (f *front) stop() {
	f.exports.stop()
}

// maxSOAPBody bounds what is read of a SOAP request: the largest legitimate ones
// (CreateVM with many devices) are a few hundred KB.
const maxSOAPBody = 32 << 20

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == faultPath || r.URL.Path == statsPath:
		f.faults.ServeHTTP(w, r)
	case r.URL.Path == knobPath:
		knobs.ServeHTTP(w, r)
	case strings.HasPrefix(r.URL.Path, nfcPrefix) && f.exports.serve(w, r):
		// an export lease's disk; other /nfc/ paths are the simulator's import leases
	case r.Method == http.MethodPost && (r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService"):
		f.serveSDK(w, r)
	default:
		f.sim.ServeHTTP(w, r)
	}
}

// serveSDK decodes the SOAP call to decide whether it needs the test bed's help.
func (f *front) serveSDK(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxSOAPBody))
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}

	method, err := simulator.UnmarshalBody(typeFunc, body)
	if err != nil {
		// Let the simulator answer with its own fault.
		f.forward(w, r, body)
		return
	}

	switch method.Name {
	case "RetrieveProperties", "RetrievePropertiesEx", "WaitForUpdatesEx", "Fetch":
		refreshFacts()
	}

	switch method.Name {
	case "Fetch":
		f.fetch(w, r, body)
		return
	case "ExportVm":
		req := method.Body.(*types.ExportVm)
		if req.This.Type == "VirtualMachine" {
			req.This = f.helperFor(req.This)
			body = encodeRequest(method.Name, req)
		}
	case "CreateDescriptor":
		req := method.Body.(*types.CreateDescriptor)
		req.This = f.ovfHelper()
		body = encodeRequest(method.Name, req)
	case "CreateVM_Task":
		req := method.Body.(*types.CreateVM_Task)
		assignMACs(nil, req.Config.DeviceChange)
		placeholderFlats(req.This, req.Config.DeviceChange)
		body = encodeRequest(method.Name, req)
	case "ReconfigVM_Task":
		req := method.Body.(*types.ReconfigVM_Task)
		assignMACs(vmByRef(req.This), req.Spec.DeviceChange)
		placeholderFlats(req.This, req.Spec.DeviceChange)
		f.reconfigure(w, r, encodeRequest(method.Name, req), req.This)
		return
	case "CloneVM_Task":
		f.cloneVM(w, r, body, method.Body.(*types.CloneVM_Task))
		return
	case "CancelTask":
		req := method.Body.(*types.CancelTask)
		req.This = f.helperFor(req.This)
		body = encodeRequest(method.Name, req)
	case "SearchDatastore_Task":
		req := method.Body.(*types.SearchDatastore_Task)
		f.searchDatastore(w, r, &req.SearchSpec, func() []byte { return encodeRequest(method.Name, req) })
		return
	case "SearchDatastoreSubFolders_Task":
		req := method.Body.(*types.SearchDatastoreSubFolders_Task)
		f.searchDatastore(w, r, &req.SearchSpec, func() []byte { return encodeRequest(method.Name, req) })
		return
	}

	f.forward(w, r, body)
}

// forward hands the (possibly rewritten) request body to the simulator.
func (f *front) forward(w http.ResponseWriter, r *http.Request, body []byte) {
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	f.sim.ServeHTTP(w, r)
}

// record runs the request through the simulator and keeps the answer, for calls
// whose result the test bed must look at before the client sees it.
func (f *front) record(r *http.Request, body []byte) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	f.forward(rec, r, body)
	return rec
}

func replay(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// typeFunc resolves vim25 type names, also with a namespace prefix ("ns1:Foo"), as the
// simulator's own decoder does.
func typeFunc(name string) (reflect.Type, bool) {
	lookup := types.TypeFunc()
	if t, ok := lookup(name); ok {
		return t, ok
	}
	if i := strings.IndexByte(name, ':'); i >= 0 {
		return lookup(name[i+1:])
	}
	return nil, false
}

const (
	soapEnvelopeStart = `<?xml version="1.0" encoding="UTF-8"?>` +
		`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"` +
		` xmlns:xsd="http://www.w3.org/2001/XMLSchema"` +
		` xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
	soapEnvelopeEnd = `</soapenv:Body></soapenv:Envelope>`
)

// encodeRequest turns a decoded (and changed) request back into the SOAP envelope the
// simulator decodes, with govmomi's encoder, as govmomi's own client does.
func encodeRequest(name string, req interface{}) []byte {
	var buf bytes.Buffer
	buf.WriteString(soapEnvelopeStart)
	enc := xml.NewEncoder(&buf)
	start := xml.StartElement{Name: xml.Name{Space: "urn:vim25", Local: name}}
	if err := enc.EncodeElement(req, start); err != nil {
		// Only a programming error gets here: the value was just decoded.
		panic(fmt.Sprintf("encoding %s: %s", name, err))
	}
	if err := enc.Flush(); err != nil {
		panic(err)
	}
	buf.WriteString(soapEnvelopeEnd)
	return buf.Bytes()
}

// writeSOAP answers a call directly with the given inner XML of soapenv:Body.
func writeSOAP(w http.ResponseWriter, status int, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, soapEnvelopeStart+inner+soapEnvelopeEnd)
}

func logf(format string, args ...interface{}) {
	log.Printf(format, args...)
}
