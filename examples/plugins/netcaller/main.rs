//! netcaller: tries to reach the network (loopback only; never an outside address).

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use plugin_runner::{Methods, Plugin};

struct Net;

fn tcp(addr: String) -> Result<String, String> {
    let addr = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(mut s) => {
            let _ = s.write_all(b"hello from a plugin\n");
            Ok("connected".into())
        }
        Err(e) => Ok(format!("error: {e}")),
    }
}

fn udp(addr: String) -> Result<String, String> {
    match UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"ping", addr.as_str())) {
        Ok(_) => Ok("sent".into()),
        Err(e) => Ok(format!("error: {e}")),
    }
}

fn netlink(_: ()) -> Result<String, String> {
    // SAFETY: socket() takes integers; the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Ok(format!("error: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by socket().
    unsafe { libc::close(fd) };
    Ok("opened".into())
}

impl Plugin for Net {
    fn methods(m: &mut Methods<Self>) {
        m.typed("tcp", |_, addr: String| tcp(addr));
        m.typed("udp", |_, addr: String| udp(addr));
        m.typed("netlink", |_, ()| netlink(()));
        m.typed("netns", |_, _: ()| -> Result<String, String> {
            std::fs::read_link("/proc/self/ns/net")
                .map(|p| p.display().to_string())
                .map_err(|e| e.to_string())
        });
    }
}

fn main() {
    plugin_runner::serve(Net)
}
