// Package shared holds what the go-plugin host and plugin agree on: the handshake, the
// Strategy interface, and its net/rpc and gRPC transports.
package shared

import (
	"context"
	"net/rpc"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"plugdpeer/tickpb"
)

// Handshake keeps other binaries from being run as this plugin.
var Handshake = plugin.HandshakeConfig{ProtocolVersion: 1, MagicCookieKey: "PLUGD_PEER", MagicCookieValue: "tick"}

// Tick is the request.
type Tick struct {
	Symbol   string
	Bid, Ask float64
	Ts       uint64
}

// Quote is the reply.
type Quote struct {
	Symbol string
	Mid    float64
	Ts     uint64
	Ok     bool
}

// Strategy is the plugin's interface.
type Strategy interface {
	OnTick(Tick) (Quote, error)
}

// RPCClient is the host side over net/rpc.
type RPCClient struct{ client *rpc.Client }

// OnTick calls the plugin.
func (c *RPCClient) OnTick(t Tick) (Quote, error) {
	var q Quote
	err := c.client.Call("Plugin.OnTick", t, &q)
	return q, err
}

// RPCServer is the plugin side over net/rpc.
type RPCServer struct{ Impl Strategy }

// OnTick serves one call.
func (s *RPCServer) OnTick(t Tick, q *Quote) error {
	r, err := s.Impl.OnTick(t)
	*q = r
	return err
}

// NetRPCPlugin serves Strategy over net/rpc.
type NetRPCPlugin struct{ Impl Strategy }

// Server returns the net/rpc server.
func (p *NetRPCPlugin) Server(*plugin.MuxBroker) (interface{}, error) {
	return &RPCServer{Impl: p.Impl}, nil
}

// Client returns the net/rpc client.
func (NetRPCPlugin) Client(b *plugin.MuxBroker, c *rpc.Client) (interface{}, error) {
	return &RPCClient{client: c}, nil
}

// GRPCPlugin serves Strategy over gRPC.
type GRPCPlugin struct {
	plugin.Plugin
	Impl Strategy
}

// GRPCServer registers the service.
func (p *GRPCPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	tickpb.RegisterStrategyServer(s, &grpcServer{impl: p.Impl})
	return nil
}

// GRPCClient returns the gRPC client.
func (p *GRPCPlugin) GRPCClient(ctx context.Context, b *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &grpcClient{c: tickpb.NewStrategyClient(c)}, nil
}

type grpcServer struct {
	tickpb.UnimplementedStrategyServer
	impl Strategy
}

func (s *grpcServer) OnTick(ctx context.Context, t *tickpb.Tick) (*tickpb.Quote, error) {
	q, err := s.impl.OnTick(Tick{Symbol: t.Symbol, Bid: t.Bid, Ask: t.Ask, Ts: t.Ts})
	if err != nil {
		return nil, err
	}
	return &tickpb.Quote{Symbol: q.Symbol, Mid: q.Mid, Ts: q.Ts, Ok: q.Ok}, nil
}

type grpcClient struct{ c tickpb.StrategyClient }

func (g *grpcClient) OnTick(t Tick) (Quote, error) {
	r, err := g.c.OnTick(context.Background(), &tickpb.Tick{Symbol: t.Symbol, Bid: t.Bid, Ask: t.Ask, Ts: t.Ts})
	if err != nil {
		return Quote{}, err
	}
	return Quote{Symbol: r.Symbol, Mid: r.Mid, Ts: r.Ts, Ok: r.Ok}, nil
}
