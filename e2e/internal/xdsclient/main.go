// Command xdsclient is a plain grpc-go xDS client, a test tool of the e2e
// tests: it imports grpc-go and the standard library only — no beacon
// code — as any user of beacon's xDS control plane would. It reads its
// bootstrap from GRPC_XDS_BOOTSTRAP, dials xds:///TARGET and makes
// grpc.testing.TestService UnaryCalls until its stdin closes or it gets
// SIGTERM, printing one line per call:
//
//	ok SERVER_ID
//	err CODE MESSAGE
//
// SERVER_ID is the answer's server_id (the echo service puts its instance
// id there); CODE is the gRPC status code's name.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	_ "google.golang.org/grpc/xds" // the xds:/// resolver and the xDS balancers
)

func main() {
	var (
		target  = flag.String("target", "orders", "service to dial: xds:///TARGET")
		timeout = flag.Duration("timeout", 10*time.Second, "per-call timeout (calls wait for a ready connection)")
		workers = flag.Int("workers", 1, "calls in flight at once")
		every   = flag.Duration("every", 0, "start at most one call per this interval, all workers together (0: no limit)")
	)
	flag.Parse()
	log.SetPrefix("xdsclient: ")
	log.SetFlags(0)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() { // a closed stdin stops the calls too
		io.Copy(io.Discard, os.Stdin)
		stop()
	}()

	cc, err := grpc.NewClient("xds:///"+*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer cc.Close()
	client := testpb.NewTestServiceClient(cc)

	var pace <-chan time.Time
	if *every > 0 {
		tick := time.NewTicker(*every)
		defer tick.Stop()
		pace = tick.C
	}
	var mu sync.Mutex // one line at a time
	var wg sync.WaitGroup
	for range *workers {
		wg.Go(func() {
			for {
				if pace != nil {
					select {
					case <-ctx.Done():
						return
					case <-pace:
					}
				}
				if ctx.Err() != nil {
					return
				}
				line := call(ctx, client, *timeout)
				if ctx.Err() != nil {
					return // a call cut short by the stop is not a result
				}
				mu.Lock()
				fmt.Println(line)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// call makes one UnaryCall and describes its outcome in one line.
func call(ctx context.Context, client testpb.TestServiceClient, timeout time.Duration) string {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := client.UnaryCall(ctx, &testpb.SimpleRequest{}, grpc.WaitForReady(true))
	if err != nil {
		st := status.Convert(err)
		return fmt.Sprintf("err %s %s", st.Code(), strings.ReplaceAll(st.Message(), "\n", " "))
	}
	return "ok " + resp.GetServerId()
}
