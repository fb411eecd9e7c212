//! Peer: servo's ipc-channel — typed channels between processes (serde over a Unix socket),
//! one request in flight. The plugin is this binary re-executed with `--plugin NAME`.

use ipc_channel::ipc::{self, IpcOneShotServer, IpcReceiver, IpcSender};
use plugd_peers::{answer, report, samples, tick, Quote, Tick};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--plugin") {
        // Connect back to the host's one-shot server and hand it our channels.
        let boot: IpcSender<(IpcSender<Tick>, IpcReceiver<Quote>)> =
            IpcSender::connect(args[2].clone()).unwrap();
        let (tick_tx, tick_rx) = ipc::channel::<Tick>().unwrap();
        let (quote_tx, quote_rx) = ipc::channel::<Quote>().unwrap();
        boot.send((tick_tx, quote_rx)).unwrap();
        while let Ok(t) = tick_rx.recv() {
            if quote_tx.send(answer(&t)).is_err() {
                break;
            }
        }
        return;
    }
    let (server, name) = IpcOneShotServer::<(IpcSender<Tick>, IpcReceiver<Quote>)>::new().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--plugin")
        .arg(name)
        .spawn()
        .unwrap();
    let (_, (tx, rx)) = server.accept().unwrap();
    let (warmup, n) = samples();
    let mut ns = Vec::with_capacity(n);
    for i in 0..(warmup + n) as u64 {
        let t0 = std::time::Instant::now();
        tx.send(tick(i)).unwrap();
        let q = rx.recv().unwrap();
        assert_eq!(q.ts, i);
        if i >= warmup as u64 {
            ns.push(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(tx);
    let _ = child.wait();
    report("ipc-channel", ns);
}
