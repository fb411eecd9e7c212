//! Peer: the naive Rust design — a tokio UnixStream per plugin, length-prefixed bincode,
//! one request in flight. The plugin is this binary re-executed with `--plugin`.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;

use plugd_peers::{answer, report, samples, tick, Quote, Tick};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn send<T: serde::Serialize>(s: &mut UnixStream, v: &T) {
    let body = bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).await.unwrap();
}

async fn recv<T: serde::de::DeserializeOwned>(s: &mut UnixStream) -> Option<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(bincode::serde::decode_from_slice(&body, bincode::config::standard()).unwrap().0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    if std::env::args().nth(1).as_deref() == Some("--plugin") {
        // SAFETY: fd 3 is the socket the host passed us, owned by nobody else here.
        let std_sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(3) };
        std_sock.set_nonblocking(true).unwrap();
        rt.block_on(async move {
            let mut s = UnixStream::from_std(std_sock).unwrap();
            while let Some(t) = recv::<Tick>(&mut s).await {
                send(&mut s, &answer(&t)).await;
            }
        });
        return;
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.arg("--plugin");
    // SAFETY: dup2 in the child before exec; async-signal-safe.
    unsafe {
        child.pre_exec(move || {
            if libc_dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = child.spawn().unwrap();
    let (warmup, n) = samples();
    ours.set_nonblocking(true).unwrap();
    let ns = rt.block_on(async move {
        let mut s = UnixStream::from_std(ours).unwrap();
        let mut ns = Vec::with_capacity(n);
        for i in 0..(warmup + n) as u64 {
            let t0 = std::time::Instant::now();
            send(&mut s, &tick(i)).await;
            let q: Quote = recv(&mut s).await.unwrap();
            assert_eq!(q.ts, i);
            if i >= warmup as u64 {
                ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
        ns
    });
    let _ = child.kill();
    report("tokio-unixstream-bincode", ns);
}

extern "C" {
    #[link_name = "dup2"]
    fn libc_dup2(old: i32, new: i32) -> i32;
}
