//! The shared-memory transport's rings (`transport = "shm"`, PROTOCOL.md section 8).
//!
//! One mapping (a memfd the supervisor creates and hands to the plugin) holds two
//! single-producer, single-consumer byte rings: **calls** (supervisor → plugin) and
//! **replies** (plugin → supervisor). A ring carries the same frames as the socket: a
//! u32 little-endian length, then the bincode body. Only calls and their answers travel
//! here; the socket stays for everything else, and for crash detection.
//!
//! The mapping is shared with a process plugd does not trust. Whoever reads a ring keeps
//! its own position and never takes one from the mapping on faith: every length and
//! position read from the mapping is checked against the ring's size before use, and a
//! frame is copied out of the mapping before it is decoded. What a hostile peer can do is
//! make its own ring say nonsense, which the reader reports as [`ShmError::Violation`].
//!
//! Waiting: a reader either spins on the ring's `bell` word, sleeps on it as a futex
//! (shared, not private: the two sides are different processes), or spins for a while
//! and then sleeps ([`WaitStrategy`]). A writer rings the bell after every frame and
//! makes the futex wake call only when the reader said it may be asleep.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `b"PLSM"` read as a little-endian u32: the mapping's first word.
pub const SHM_MAGIC: u32 = u32::from_le_bytes(*b"PLSM");

/// The layout version, the mapping's second word.
pub const SHM_LAYOUT: u32 = 1;

/// Each ring's default data size, in bytes (a frame larger than half of it goes by the
/// socket instead).
pub const DEFAULT_RING: usize = 256 << 10;

/// Bytes before the first ring's data: the preamble (64) and two ring headers (128 each).
const DATA_START: usize = 64 + 2 * HEADER;
/// A ring's header: the writer's cache line, then the reader's.
const HEADER: usize = 128;

/// Why a mapping cannot be used, or what a peer did wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The system refused (memfd_create, ftruncate, mmap, fstat).
    #[error("shared memory: {0}")]
    Os(#[from] std::io::Error),
    /// The mapping is not a plugd shm mapping of a layout this side knows.
    #[error("shared memory: {0}")]
    Layout(String),
    /// The peer broke the ring's rules (a position or length out of bounds).
    #[error("shared memory ring violated by the peer: {0}")]
    Violation(String),
}

/// How a reader waits for the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitStrategy {
    /// Busy-poll: the lowest latency, and a whole CPU burned while waiting.
    Spin,
    /// Poll for a short while (about 50 µs), then sleep on the futex.
    #[default]
    SpinThenFutex,
    /// Sleep on the futex at once.
    Futex,
}

impl WaitStrategy {
    /// The strategy named in a manifest (`spin`, `spin-then-futex`, `futex`).
    pub fn from_word(word: &str) -> Option<WaitStrategy> {
        match word {
            "spin" => Some(WaitStrategy::Spin),
            "spin-then-futex" => Some(WaitStrategy::SpinThenFutex),
            "futex" => Some(WaitStrategy::Futex),
            _ => None,
        }
    }

    /// Its manifest word.
    pub fn word(self) -> &'static str {
        match self {
            WaitStrategy::Spin => "spin",
            WaitStrategy::SpinThenFutex => "spin-then-futex",
            WaitStrategy::Futex => "futex",
        }
    }
}

/// How long `SpinThenFutex` spins before it sleeps.
const SPIN_FOR: Duration = Duration::from_micros(50);

/// A mapped shm region: two rings of `ring` bytes each.
pub struct Mapping {
    base: *mut u8,
    len: usize,
    ring: usize,
}

// SAFETY: the mapping is plain shared memory; every access this module makes to it is
// an atomic operation on an aligned word or a byte copy into or out of private memory,
// and the rings' single-producer/single-consumer discipline is kept by the Producer and
// Consumer handles (each is !Sync and used by one thread at a time).
unsafe impl Send for Mapping {}
// SAFETY: as above: shared access goes through atomics and byte copies only.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base and len are what mmap returned; nothing borrows the mapping past
        // its owner's life (Ring, Producer and Consumer borrow the Mapping).
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).field("ring", &self.ring).finish()
    }
}

impl Mapping {
    /// Creates a mapping with two rings of `ring` bytes (a power of two, at least 4 KiB),
    /// and the memfd to hand to the plugin (close-on-exec; the spawner dups it into place).
    pub fn create(ring: usize) -> Result<(Mapping, OwnedFd), ShmError> {
        if !ring.is_power_of_two() || !(4096..=(1 << 30)).contains(&ring) {
            return Err(ShmError::Layout(format!(
                "a ring of {ring} bytes: it must be a power of two from 4 KiB to 1 GiB"
            )));
        }
        let len = DATA_START + 2 * ring;
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"plugd-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid descriptor and a length that fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let map = Mapping::map(&fd, len, ring)?;
        map.word32(0).store(SHM_MAGIC, Ordering::Relaxed);
        map.word32(4).store(SHM_LAYOUT, Ordering::Relaxed);
        map.word32(8).store(ring as u32, Ordering::Release);
        Ok((map, fd))
    }

    /// Maps the region behind `fd` (the plugin's side), checking its preamble and size.
    pub fn open(fd: &OwnedFd) -> Result<Mapping, ShmError> {
        // SAFETY: a zeroed stat buffer for fstat to fill; the result is checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a valid stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let len = st.st_size as usize;
        if len < DATA_START + 2 * 4096 {
            return Err(ShmError::Layout(format!("a mapping of {len} bytes is too small")));
        }
        let mut probe = Mapping::map(fd, len, 0)?;
        let (magic, layout) =
            (probe.word32(0).load(Ordering::Acquire), probe.word32(4).load(Ordering::Acquire));
        let ring = probe.word32(8).load(Ordering::Acquire) as usize;
        if magic != SHM_MAGIC || layout != SHM_LAYOUT {
            return Err(ShmError::Layout(format!(
                "not a plugd mapping of layout {SHM_LAYOUT} (magic {magic:#x}, layout {layout})"
            )));
        }
        if !ring.is_power_of_two() || DATA_START + 2 * ring != len {
            return Err(ShmError::Layout(format!("rings of {ring} bytes do not fill {len}")));
        }
        probe.ring = ring;
        Ok(probe)
    }

    fn map(fd: &OwnedFd, len: usize, ring: usize) -> Result<Mapping, ShmError> {
        // SAFETY: a fresh shared mapping of a descriptor we hold; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Mapping { base: base.cast(), len, ring })
    }

    /// The size of each ring, in bytes.
    pub fn ring_size(&self) -> usize {
        self.ring
    }

    /// The calls ring (the supervisor writes it, the plugin reads it).
    pub fn calls(self: &Arc<Self>) -> Ring {
        Ring { map: self.clone(), header: 64, data: DATA_START }
    }

    /// The replies ring (the plugin writes it, the supervisor reads it).
    pub fn replies(self: &Arc<Self>) -> Ring {
        Ring { map: self.clone(), header: 64 + HEADER, data: DATA_START + self.ring }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= self.len);
        // SAFETY: off is a 4-aligned offset inside the mapping (page-aligned base), and
        // the word is only ever accessed atomically by either process.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.len);
        // SAFETY: as for word32, 8-aligned.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    /// Every byte of the mapping, for a test that plays a hostile peer.
    #[doc(hidden)]
    pub fn scribble(&self, off: usize, bytes: &[u8]) {
        let n = bytes.len().min(self.len.saturating_sub(off));
        // SAFETY: the range [off, off + n) is inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), n) }
    }

    /// The mapping's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a mapping has its preamble at least.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// One ring of a mapping. Header words (offsets from `header`): the writer's line holds
/// `head` (u64, bytes written in all) at 0 and `bell` (u32, bumped after every frame and
/// every doorbell) at 8 and `sock` (u32, bumped when the socket has news) at 12; the
/// reader's line holds `tail` (u64, bytes consumed in all) at 64 and `sleeping` (u32,
/// nonzero while the reader may be asleep on `bell`) at 72.
#[derive(Clone)]
pub struct Ring {
    map: Arc<Mapping>,
    header: usize,
    data: usize,
}

impl Ring {
    fn head(&self) -> &AtomicU64 {
        self.map.word64(self.header)
    }
    fn bell(&self) -> &AtomicU32 {
        self.map.word32(self.header + 8)
    }
    fn sock(&self) -> &AtomicU32 {
        self.map.word32(self.header + 12)
    }
    fn tail(&self) -> &AtomicU64 {
        self.map.word64(self.header + 64)
    }
    fn sleeping(&self) -> &AtomicU32 {
        self.map.word32(self.header + 72)
    }

    /// The writing end (one per ring, on one side).
    pub fn producer(self) -> Producer {
        let head = self.head().load(Ordering::Acquire);
        Producer { ring: self, head }
    }

    /// The reading end (one per ring, on the other side).
    pub fn consumer(self) -> Consumer {
        let tail = self.tail().load(Ordering::Acquire);
        let seen_sock = self.sock().load(Ordering::Acquire);
        Consumer { ring: self, tail, seen_sock }
    }

    /// Tells this ring's reader the socket has something for it (it checks the socket
    /// next). Needs no producer: it moves no position.
    pub fn doorbell(&self) {
        self.sock().fetch_add(1, Ordering::Release);
        self.ring_bell();
    }

    fn ring_bell(&self) {
        self.bell().fetch_add(1, Ordering::SeqCst);
        // Pairs with the reader's store of `sleeping` and its re-check (a Dekker fence):
        // either it sees our frame, or we see that it sleeps and wake it.
        fence(Ordering::SeqCst);
        if self.sleeping().load(Ordering::SeqCst) != 0 {
            futex_wake(self.bell());
        }
    }

    /// Copies `src` into the ring's data at position `pos` (wrapping).
    fn copy_in(&self, pos: u64, src: &[u8]) {
        let cap = self.map.ring;
        let at = (pos as usize) & (cap - 1);
        let first = src.len().min(cap - at);
        // SAFETY: [data + at, data + at + first) and [data, data + rest) lie inside the
        // ring's data (at < cap, first <= cap - at, rest = len - first <= cap, as
        // src.len() <= cap is checked by the caller).
        unsafe {
            let base = self.map.base.add(self.data);
            std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), base, src.len() - first);
        }
    }

    /// Copies `dst.len()` bytes out of the ring's data from position `pos` (wrapping).
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let cap = self.map.ring;
        let at = (pos as usize) & (cap - 1);
        let first = dst.len().min(cap - at);
        // SAFETY: as in copy_in, with dst.len() <= cap checked by the caller; the bytes
        // are copied into private memory before anything reads them.
        unsafe {
            let base = self.map.base.add(self.data);
            std::ptr::copy_nonoverlapping(base.add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(base, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}

/// The writing end of a ring.
pub struct Producer {
    ring: Ring,
    /// Our own count of bytes written (the mapping's copy is for the reader).
    head: u64,
}

impl Producer {
    /// The largest frame this ring takes (a larger one goes by the socket).
    pub fn max_frame(&self) -> usize {
        self.ring.map.ring / 2
    }

    /// Appends one whole frame (length prefix included) and rings the bell. `Ok(false)`:
    /// no room now (the reader is behind); Err: the reader's position is impossible.
    pub fn push(&mut self, frame: &[u8]) -> Result<bool, ShmError> {
        let cap = self.ring.map.ring as u64;
        if frame.len() > self.max_frame() {
            return Ok(false);
        }
        let tail = self.ring.tail().load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > cap {
            return Err(ShmError::Violation(format!(
                "the reader says it consumed {tail}, but {} bytes were written",
                self.head
            )));
        }
        if cap - used < frame.len() as u64 {
            return Ok(false);
        }
        self.ring.copy_in(self.head, frame);
        self.head += frame.len() as u64;
        self.ring.head().store(self.head, Ordering::Release);
        self.ring.ring_bell();
        Ok(true)
    }

    /// Tells the reader the socket has something for it (see [`Ring::doorbell`]).
    pub fn doorbell(&self) {
        self.ring.doorbell();
    }
}

/// What a reader's wait ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A frame may be ready on the ring.
    Ring,
    /// The socket has news (the writer rang the doorbell).
    Socket,
    /// The deadline passed first (or the slice given to a wait ended).
    Timeout,
}

/// The reading end of a ring.
pub struct Consumer {
    ring: Ring,
    /// Our own count of bytes consumed: never read back from the mapping.
    tail: u64,
    seen_sock: u32,
}

impl Consumer {
    /// Bytes published and not yet consumed, checked against the ring's size.
    fn available(&self) -> Result<u64, ShmError> {
        let head = self.ring.head().load(Ordering::Acquire);
        let avail = head.wrapping_sub(self.tail);
        if avail > self.ring.map.ring as u64 {
            return Err(ShmError::Violation(format!(
                "the writer says it wrote {head}, but {} were consumed and the ring holds {}",
                self.tail, self.ring.map.ring
            )));
        }
        Ok(avail)
    }

    /// The next whole frame's body (copied out of the mapping), None if there is none yet.
    /// Err when the writer broke the ring's rules: the frame claims more than `max_frame`
    /// or more than the ring can hold, or a position is impossible.
    pub fn pop(&mut self, max_frame: usize) -> Result<Option<Vec<u8>>, ShmError> {
        let avail = self.available()?;
        if avail < 4 {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.ring.copy_out(self.tail, &mut len);
        let len = u32::from_le_bytes(len) as usize;
        if len > max_frame || len > self.ring.map.ring / 2 {
            return Err(ShmError::Violation(format!(
                "a frame of {len} bytes (at most {} here)",
                max_frame.min(self.ring.map.ring / 2)
            )));
        }
        if avail < 4 + len as u64 {
            // A writer publishes whole frames: a partial one is a lie, or a slow writer.
            return Ok(None);
        }
        let mut body = vec![0u8; len];
        self.ring.copy_out(self.tail + 4, &mut body);
        self.tail += 4 + len as u64;
        self.ring.tail().store(self.tail, Ordering::Release);
        Ok(Some(body))
    }

    /// Whether the writer rang the doorbell since the last call (the socket has news).
    pub fn socket_news(&mut self) -> bool {
        let now = self.ring.sock().load(Ordering::Acquire);
        let news = now != self.seen_sock;
        self.seen_sock = now;
        news
    }

    /// Waits (per `strategy`) until a frame may be ready, the doorbell rings, or
    /// `deadline` passes. Wakes are at most `slice` apart (to check liveness).
    pub fn wait(
        &mut self,
        strategy: WaitStrategy,
        deadline: Option<Instant>,
        slice: Duration,
    ) -> Result<Woken, ShmError> {
        let start = Instant::now();
        let until = deadline.map_or(start + slice, |d| d.min(start + slice));
        let spin_until = match strategy {
            WaitStrategy::Spin => until,
            WaitStrategy::SpinThenFutex => until.min(start + SPIN_FOR),
            WaitStrategy::Futex => start,
        };
        let mut n = 0u32;
        loop {
            if let Some(w) = self.ready()? {
                return Ok(w);
            }
            n = n.wrapping_add(1);
            if n % 64 == 0 {
                if Instant::now() >= spin_until {
                    break;
                }
                // The writer may share this CPU (both pinned to one): let it run. On
                // another CPU this costs one cheap syscall every 64 looks.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        if strategy == WaitStrategy::Spin {
            return Ok(Woken::Timeout);
        }
        loop {
            let bell = self.ring.bell().load(Ordering::SeqCst);
            self.ring.sleeping().store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(w) = self.ready()? {
                self.ring.sleeping().store(0, Ordering::SeqCst);
                return Ok(w);
            }
            let now = Instant::now();
            if now >= until {
                self.ring.sleeping().store(0, Ordering::SeqCst);
                return Ok(Woken::Timeout);
            }
            futex_wait(self.ring.bell(), bell, until - now);
            self.ring.sleeping().store(0, Ordering::SeqCst);
        }
    }

    fn ready(&mut self) -> Result<Option<Woken>, ShmError> {
        if self.available()? >= 4 {
            return Ok(Some(Woken::Ring));
        }
        if self.ring.sock().load(Ordering::Acquire) != self.seen_sock {
            return Ok(Some(Woken::Socket));
        }
        Ok(None)
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout` (a shared futex: the word is
/// in memory two processes map).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: word is a valid, aligned u32 for the duration of the call, and ts a valid
    // timespec; FUTEX_WAIT only reads them. EAGAIN, EINTR and ETIMEDOUT all mean "look
    // again", which the callers do.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes one sleeper on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a valid, aligned u32; FUTEX_WAKE does not dereference it beyond
    // hashing its address.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_go_through_in_order_across_the_wrap() {
        let (map, fd) = Mapping::create(4096).unwrap();
        let (map, other) = (Arc::new(map), Arc::new(Mapping::open(&fd).unwrap()));
        let mut tx = map.calls().producer();
        let mut rx = other.calls().consumer();
        for round in 0..200u32 {
            let body: Vec<u8> =
                (0..(round % 700) as usize).map(|i| (i as u8) ^ round as u8).collect();
            assert!(tx.push(&frame(&body)).unwrap(), "room in round {round}");
            assert_eq!(rx.pop(1 << 20).unwrap().as_deref(), Some(&body[..]));
        }
        assert_eq!(rx.pop(1 << 20).unwrap(), None);
    }

    #[test]
    fn a_full_ring_says_so_and_an_oversized_frame_is_refused() {
        let (map, _fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let mut tx = map.replies().producer();
        let mut rx = map.replies().consumer();
        assert!(!tx.push(&vec![0u8; 2049]).unwrap(), "over half the ring goes by the socket");
        let f = frame(&[7u8; 1000]);
        let mut pushed = 0;
        while tx.push(&f).unwrap() {
            pushed += 1;
        }
        assert_eq!(pushed, 4);
        assert!(rx.pop(4096).unwrap().is_some());
        assert!(tx.push(&f).unwrap(), "room again once the reader moved on");
    }

    #[test]
    fn a_hostile_writer_is_a_violation_never_a_wrong_read() {
        let (map, _fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let mut rx = map.replies().consumer();
        let ring = map.replies();
        // head far beyond what the ring can hold
        ring.head().store(1 << 40, Ordering::Release);
        assert!(matches!(rx.pop(1 << 20), Err(ShmError::Violation(_))));
        // a frame claiming more than the ring
        ring.head().store(8, Ordering::Release);
        map.scribble(DATA_START + 4096, &u32::MAX.to_le_bytes());
        assert!(matches!(rx.pop(1 << 20), Err(ShmError::Violation(_))));
        // a frame claiming more than max_frame
        map.scribble(DATA_START + 4096, &100u32.to_le_bytes());
        assert!(matches!(rx.pop(10), Err(ShmError::Violation(_))));
        // and a reader that lies about its tail to the writer
        let mut tx = map.calls().producer();
        map.calls().tail().store(u64::MAX / 2, Ordering::Release);
        assert!(matches!(tx.push(&frame(b"x")), Err(ShmError::Violation(_))));
    }

    #[test]
    fn random_bytes_in_the_mapping_never_panic_or_read_out_of_bounds() {
        let (map, _fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut rx = map.replies().consumer();
            let junk: Vec<u8> = (0..64).map(|_| next() as u8).collect();
            let at = (next() as usize) % (map.len() - 64);
            map.scribble(at, &junk);
            // the writer's header words too, now and then
            if next() % 4 == 0 {
                map.replies().head().store(next() % 10_000, Ordering::Release);
            }
            for _ in 0..4 {
                match rx.pop(1 << 20) {
                    Ok(Some(body)) => assert!(body.len() <= 2048),
                    Ok(None) | Err(ShmError::Violation(_)) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn a_sleeping_reader_is_woken_by_a_frame_and_by_the_doorbell() {
        let (map, fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let writer = {
            let map = map.clone();
            std::thread::spawn(move || {
                let mut tx = map.calls().producer();
                std::thread::sleep(Duration::from_millis(30));
                tx.push(&frame(b"hi")).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                tx.doorbell();
            })
        };
        let other = Arc::new(Mapping::open(&fd).unwrap());
        let mut rx = other.calls().consumer();
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let mut woken = Vec::new();
        while woken.len() < 2 {
            match rx.wait(WaitStrategy::Futex, deadline, Duration::from_secs(10)).unwrap() {
                Woken::Ring => {
                    assert_eq!(rx.pop(1024).unwrap().as_deref(), Some(&b"hi"[..]));
                    woken.push(Woken::Ring);
                }
                Woken::Socket => {
                    assert!(rx.socket_news());
                    woken.push(Woken::Socket);
                }
                Woken::Timeout => panic!("timed out"),
            }
        }
        assert_eq!(woken, [Woken::Ring, Woken::Socket]);
        writer.join().unwrap();
    }

    #[test]
    fn a_mapping_that_is_not_ours_is_refused() {
        let (map, fd) = Mapping::create(4096).unwrap();
        map.scribble(0, b"NOPE");
        assert!(matches!(Mapping::open(&fd), Err(ShmError::Layout(_))));
        assert!(Mapping::create(5000).is_err());
    }
}
