// The go-plugin peer's plugin: answers OnTick over net/rpc or gRPC (PEER_PROTO).
package main

import (
	"os"

	"github.com/hashicorp/go-plugin"

	"plugdpeer/shared"
)

type strategy struct{}

func (strategy) OnTick(t shared.Tick) (shared.Quote, error) {
	return shared.Quote{Symbol: t.Symbol, Mid: (t.Bid + t.Ask) / 2, Ts: t.Ts, Ok: true}, nil
}

func main() {
	if os.Getenv("PEER_PROTO") == "grpc" {
		plugin.Serve(&plugin.ServeConfig{
			HandshakeConfig: shared.Handshake,
			Plugins:         map[string]plugin.Plugin{"strategy": &shared.GRPCPlugin{Impl: strategy{}}},
			GRPCServer:      plugin.DefaultGRPCServer,
		})
		return
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: shared.Handshake,
		Plugins:         map[string]plugin.Plugin{"strategy": &shared.NetRPCPlugin{Impl: strategy{}}},
	})
}
