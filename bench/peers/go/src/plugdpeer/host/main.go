// The go-plugin peer's host: one OnTick call in flight, round trips timed.
// Usage: host grpc|netrpc SAMPLES PLUGIN_BINARY. Prints RESULT name p50 p99 p99.9 samples (µs).
package main

import (
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"plugdpeer/shared"
)

func main() {
	proto, bin := os.Args[1], os.Args[3]
	n, _ := strconv.Atoi(os.Args[2])
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "PEER_PROTO="+proto)
	var p plugin.Plugin = &shared.NetRPCPlugin{}
	if proto == "grpc" {
		p = &shared.GRPCPlugin{}
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  shared.Handshake,
		Plugins:          map[string]plugin.Plugin{"strategy": p},
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolNetRPC, plugin.ProtocolGRPC},
		Logger:           hclog.New(&hclog.LoggerOptions{Level: hclog.Error, Output: os.Stderr}),
	})
	defer client.Kill()
	rpc, err := client.Client()
	if err != nil {
		panic(err)
	}
	raw, err := rpc.Dispense("strategy")
	if err != nil {
		panic(err)
	}
	s := raw.(shared.Strategy)
	warmup := n / 10
	lat := make([]int64, 0, n)
	for i := 0; i < warmup+n; i++ {
		t0 := time.Now()
		q, err := s.OnTick(shared.Tick{Symbol: "BTC-USD", Bid: 100.0, Ask: 100.02, Ts: uint64(i)})
		el := time.Since(t0).Nanoseconds()
		if err != nil || q.Ts != uint64(i) || !q.Ok {
			panic(fmt.Sprintf("bad reply %v %v", q, err))
		}
		if i >= warmup {
			lat = append(lat, el)
		}
	}
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	at := func(q float64) float64 { return float64(lat[int(float64(len(lat)-1)*q+0.5)]) / 1000 }
	fmt.Printf("RESULT go-plugin-%s %.1f %.1f %.1f %d\n", proto, at(0.5), at(0.99), at(0.999), len(lat))
}
