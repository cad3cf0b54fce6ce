// Command vcsim is the test bed's vCenter (or ESXi) stand-in.
//
// It wraps the simulator package of Debian's govmomi 0.24.2, which ships no vcsim
// program, and adds what v2k needs and 0.24.2 lacks: VirtualMachine.ExportVm with an
// HttpNfcLease whose device URLs serve the disks with Range support (export.go),
// OvfManager.CreateDescriptor (descriptor.go), fixes for the faults of 0.24.2 that a
// pyvmomi client meets (fixes.go), fault injection for tests (faults.go), the facts
// about data that v2k keys on (facts.go: about.instanceUuid, datastore space, CBT
// changeIds; browser.go: file sizes and times), clones that take time and can be
// cancelled (clone.go), and knobs for tests (knobs.go).
//
// The additions sit in an HTTP handler in front of the simulator (router.go): wrapping
// *simulator.VirtualMachine in the simulator's registry breaks snapshots and container
// views, routing requests in front of it does not.
//
// The password of the only accepted user comes from the VCSIM_PASSWORD environment
// variable, never from the command line (process lists are world readable).
package main

import (
	"crypto/sha1"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

type options struct {
	listen         string
	certFile       string
	keyFile        string
	esx            bool
	dc             int
	cluster        int
	host           int
	standaloneHost int
	vm             int
	ds             int
	pg             int
	dir            string
	readyFile      string
	user           string
	leaseTimeout   int
	trace          bool
	instanceUUID   string
	cloneRateKbps  int64
	cloneMinMs     int64
}

func main() {
	var o options
	flag.StringVar(&o.listen, "listen", "127.0.0.1:0", "address to listen on; port 0 picks a free port")
	flag.StringVar(&o.certFile, "cert", "", "PEM server certificate (chain) to serve TLS with")
	flag.StringVar(&o.keyFile, "key", "", "PEM private key of -cert")
	flag.BoolVar(&o.esx, "esx", false, "simulate a standalone ESXi host (ha-datacenter) instead of vCenter")
	flag.IntVar(&o.dc, "dc", 1, "datacenters (vCenter model)")
	flag.IntVar(&o.cluster, "cluster", 1, "clusters per datacenter (vCenter model)")
	flag.IntVar(&o.host, "host", 2, "hosts per cluster (vCenter model)")
	flag.IntVar(&o.standaloneHost, "standalone-host", 0, "standalone hosts per datacenter (vCenter model)")
	flag.IntVar(&o.vm, "vm", 0, "VMs the model creates per resource pool (0: the inventory is made through the API)")
	flag.IntVar(&o.ds, "ds", 2, "local datastores, mounted on every host")
	flag.IntVar(&o.pg, "pg", 1, "distributed port groups per datacenter (\"VM Network\" exists anyway)")
	flag.StringVar(&o.dir, "dir", "", "directory for the datastores' backing directories (default: the system temp dir)")
	flag.StringVar(&o.readyFile, "ready-file", "", "once listening, write {\"url\", \"port\", \"pid\"} as JSON to this file")
	flag.StringVar(&o.user, "user", "", "the only user accepted when VCSIM_PASSWORD is set (default administrator@vsphere.local, root with -esx)")
	flag.IntVar(&o.leaseTimeout, "lease-timeout", 300, "seconds an export lease lives without progress or transfer")
	flag.BoolVar(&o.trace, "trace", false, "write SOAP traffic to stderr")
	flag.StringVar(&o.instanceUUID, "instance-uuid", "", "ServiceContent.about.instanceUuid (default: a random one)")
	flag.Int64Var(&o.cloneRateKbps, "clone-rate-kbps", 0, "KiB/s a clone copies at (0: at once); see knobs.go")
	flag.Int64Var(&o.cloneMinMs, "clone-min-ms", 0, "milliseconds every clone takes at least")
	flag.Parse()

	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("vcsim: ")

	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

func run(o options) error {
	if o.dir != "" {
		if err := os.MkdirAll(o.dir, 0o700); err != nil {
			return err
		}
		// Model.createLocalDatastore makes its backing directories with
		// ioutil.TempDir(""), which honours TMPDIR: this puts them under -dir.
		if err := os.Setenv("TMPDIR", o.dir); err != nil {
			return err
		}
	}
	simulator.Trace = o.trace

	var model *simulator.Model
	if o.esx {
		model = simulator.ESX()
	} else {
		model = simulator.VPX()
		model.Datacenter = o.dc
		model.Cluster = o.cluster
		model.ClusterHost = o.host
		model.Host = o.standaloneHost
		model.Portgroup = o.pg
	}
	model.Datastore = o.ds
	model.Machine = o.vm

	// From here on, datastore directories may exist: remove them on every way out.
	if err := model.Create(); err != nil {
		model.Remove()
		return fmt.Errorf("creating the model: %w", err)
	}

	// Model VMs are created in process, not through the front handler: give them
	// distinct MAC addresses here (0.24.2 gives the VMs of one host the same one).
	fixModelMACs()

	if o.instanceUUID == "" {
		o.instanceUUID = randomUUID()
	}
	setInstanceUUID(o.instanceUUID)
	knobs.set(o.cloneRateKbps, o.cloneMinMs)

	svc := model.Service
	tlsConfig := new(tls.Config) // without -cert: the simulator's built-in localhost certificate
	if o.certFile != "" || o.keyFile != "" {
		cert, err := tls.LoadX509KeyPair(o.certFile, o.keyFile)
		if err != nil {
			model.Remove()
			return fmt.Errorf("loading -cert/-key: %w", err)
		}
		tlsConfig.Certificates = []tls.Certificate{cert}
	}
	svc.TLS = tlsConfig

	listen := &url.URL{Host: o.listen}
	if pw := os.Getenv("VCSIM_PASSWORD"); pw != "" {
		user := o.user
		if user == "" {
			user = "administrator@vsphere.local"
			if o.esx {
				user = "root"
			}
		}
		// SessionManager.validLogin accepts exactly this pair when Listen.User is set.
		listen.User = url.UserPassword(user, pw)
	} else {
		log.Print("VCSIM_PASSWORD is not set: any non-empty user and password log in")
	}
	svc.Listen = listen

	server := svc.NewServer()

	// Put the test bed's handler in front of the simulator's mux. net/http reads
	// Server.Handler for every request, and no client knows the port before the ready
	// file is written below.
	front := newFront(server.Config.Handler, time.Duration(o.leaseTimeout)*time.Second)
	server.Config.Handler = front
	front.exports.thumbprint = sha1Thumbprint(server.Certificate().Raw)

	addr := server.Listener.Addr().(*net.TCPAddr)
	sdkURL := fmt.Sprintf("https://%s/sdk", net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port)))
	log.Printf("listening on %s (pid %d)", sdkURL, os.Getpid())

	if o.readyFile != "" {
		ready := map[string]interface{}{
			"url": sdkURL, "port": addr.Port, "pid": os.Getpid(), "instance_uuid": o.instanceUUID,
		}
		if err := writeFileAtomic(o.readyFile, ready); err != nil {
			server.Close()
			model.Remove()
			return err
		}
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	sig := <-sigs
	log.Printf("%s: stopping", sig)

	front.stop()
	// Server.Close waits for outstanding requests; a client stuck in a download must
	// not keep the datastores on disk, so give it a moment only.
	closed := make(chan struct{})
	go func() {
		server.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		log.Print("requests still running after 3s; exiting anyway")
	}
	model.Remove()
	return nil
}

// sha1Thumbprint is a certificate's SHA-1 fingerprint as vSphere shows it
// (AA:BB:...), the sslThumbprint of a lease's device URLs.
func sha1Thumbprint(der []byte) string {
	sum := sha1.Sum(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// writeFileAtomic writes v as JSON to a temporary file next to path and renames it,
// so a reader polling for path never sees a partial file.
func writeFileAtomic(path string, v interface{}) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".ready-*")
	if err != nil {
		return err
	}
	_, err = tmp.Write(data)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
	}
	return err
}
