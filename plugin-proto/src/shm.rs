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

/// The Notify a plugin sends on its socket after putting a reply in the ring, while plugd
/// asked for it (`nudge`): plugd's waiter then hears of the reply through its socket.
pub const NUDGE_NOTIFY: &str = "plugd.ring";

/// The layout version, the mapping's second word.
pub const SHM_LAYOUT: u32 = 2;

/// Each ring's default data size, in bytes (a frame larger than half of it goes by the
/// socket instead).
pub const DEFAULT_RING: usize = 256 << 10;

/// Bytes before the first ring's data: the preamble (64) and two ring headers (192 each).
const DATA_START: usize = 64 + 2 * HEADER;
/// A ring's header: the writer's cache line, the reader's, and the sleeper's flag on a
/// line of its own (read by the writer after every frame, written only when the reader
/// goes to sleep: kept off the reader's line, which moves with every frame read).
const HEADER: usize = 192;

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

/// How many times a `spin-then-futex` waiter looks before it yields the CPU (to a peer
/// that may share it). Small: on one CPU every look before the yield is wasted, on two a
/// yield costs one cheap syscall.
pub const LOOKS_PER_YIELD: u32 = 16;

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
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"plugd-shm".as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid descriptor and a length that fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // The size is sealed: a plugin that could shrink the memfd would make plugd's next
        // access to its mapping a SIGBUS. The contents stay writable (that is the point).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: a valid memfd created with MFD_ALLOW_SEALING; F_ADD_SEALS takes an int.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let map = Mapping::map(&fd, len, ring)?;
        map.word32(0).store(SHM_MAGIC, Ordering::Relaxed);
        map.word32(4).store(SHM_LAYOUT, Ordering::Relaxed);
        map.word32(8).store(ring as u32, Ordering::Release);
        Ok((map, fd))
    }

    /// Whether `fd`'s size is sealed against shrinking, as [`Mapping::create`] leaves it:
    /// plugd maps no other memfd (a shrunk one would fault under it).
    pub fn size_sealed(fd: &OwnedFd) -> bool {
        // SAFETY: F_GET_SEALS on a descriptor we hold reads flags and touches no memory.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
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

    /// For a test that plays a hostile plugin: writes `word` as the slot header plugd's
    /// reader of the replies ring comes to next (the writer's `head` says where).
    #[doc(hidden)]
    pub fn poison_next_reply(self: &Arc<Self>, word: u64) {
        let replies = self.replies();
        replies.slot(replies.head().load(Ordering::Acquire)).store(word, Ordering::Release);
    }

    /// For a test that plays a hostile plugin: random bytes (from `seed`) over what the
    /// plugin side writes in a live mapping. The slot plugd reads next gets a random word,
    /// half the time one with the due frame number and random body bytes after it (so it
    /// passes the slot checks and reaches the decoder); then random 64-byte runs over the
    /// replies ring's data and header, and now and then random positions in the calls
    /// ring's reader line.
    #[doc(hidden)]
    pub fn fuzz_plugin_side(self: &Arc<Self>, seed: u64) {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let replies = self.replies();
        let head = replies.head().load(Ordering::Acquire);
        let junk: Vec<u8> = (0..512).map(|_| next() as u8).collect();
        let len = (next() % 512).max(1) as usize;
        replies.copy_in(head + 8, &junk[..len]);
        let number = if next() % 2 == 0 {
            frame_number(replies.written().load(Ordering::Acquire))
        } else {
            next() as u32
        };
        for _ in 0..4 {
            let at = (next() as usize) % (self.ring - 64);
            self.scribble(replies.data + at, &junk[at % 448..at % 448 + 64]);
        }
        if next() % 4 == 0 {
            self.scribble(replies.header + (next() as usize % 3) * 64, &junk[..64]);
        }
        if next() % 4 == 0 {
            let calls = self.calls();
            calls.tail().store(next() % (4 * self.ring as u64), Ordering::Release);
        }
        replies.slot(head).store(len as u64 | u64::from(number) << 32, Ordering::Release);
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

/// One ring of a mapping. Its header is three cache lines (offsets from `header`):
///
/// - the writer's: `head` (u64, bytes written in all) at 0 and `frames` (u64, frames
///   written in all) at 8; only the writer touches them (for a side that maps the ring
///   again);
/// - the reader's: `tail` (u64, bytes consumed in all) at 64 and `frames` (u64, frames
///   consumed) at 72; the writer reads `tail` only when it runs short of room;
/// - the signals: `bell` (u32, the futex word, bumped when a frame or a doorbell finds
///   the reader maybe asleep) at 128, `sock` (u32, bumped when the socket has news) at
///   132, `sleeping` (u32, nonzero while the reader may sleep on `bell`) at 136, `nudge`
///   (u32, nonzero while the reader wants a socket message for every new frame) at 140.
///   They change rarely, so both sides keep the line cached.
///
/// A frame sits at a 64-byte-aligned position: a u64 slot header (body length in the low
/// 32 bits, the frame's number in the high 32), then the body, padded to the next 64
/// bytes. The writer stores the slot header last; the reader waits on that word, so a
/// small call costs one cache line moving each way, as the raw ping-pong does. The reader
/// zeroes the first word of every line it consumed, so a position it comes to next holds
/// either zero or a frame just written, never an old body's bytes.
#[derive(Clone)]
pub struct Ring {
    map: Arc<Mapping>,
    header: usize,
    data: usize,
}

/// Frames start at multiples of this (a cache line).
const SLOT: u64 = 64;

/// The number a ring's `n`-th frame (counting from 0) carries: never 0, so a zeroed slot
/// header never reads as a frame.
fn frame_number(n: u64) -> u32 {
    (n % u64::from(u32::MAX)) as u32 + 1
}

/// The bytes a frame with a body of `len` takes in a ring (slot header and padding in).
fn slot_len(len: usize) -> u64 {
    (8 + len as u64).div_ceil(SLOT) * SLOT
}

impl Ring {
    fn head(&self) -> &AtomicU64 {
        self.map.word64(self.header)
    }
    fn written(&self) -> &AtomicU64 {
        self.map.word64(self.header + 8)
    }
    fn tail(&self) -> &AtomicU64 {
        self.map.word64(self.header + 64)
    }
    fn consumed(&self) -> &AtomicU64 {
        self.map.word64(self.header + 72)
    }
    fn bell(&self) -> &AtomicU32 {
        self.map.word32(self.header + 128)
    }
    fn sock(&self) -> &AtomicU32 {
        self.map.word32(self.header + 132)
    }
    fn sleeping(&self) -> &AtomicU32 {
        self.map.word32(self.header + 136)
    }
    fn nudge(&self) -> &AtomicU32 {
        self.map.word32(self.header + 140)
    }

    /// The reader asks (`true`) or stops asking the writer to also say on the socket when
    /// it puts a frame in this ring: for a reader that waits on its socket rather than on
    /// the ring. The writer looks after every frame ([`Producer::reader_wants_nudge`]).
    pub fn ask_nudge(&self, on: bool) {
        self.nudge().store(u32::from(on), Ordering::SeqCst);
        // Pairs with the writer's fence after its slot store: either it sees the request,
        // or the reader's look at the ring after this sees the frame.
        fence(Ordering::SeqCst);
    }

    /// The slot header word at ring position `pos` (a multiple of [`SLOT`]; a position
    /// read from the mapping is rounded down to one, so no word is ever misaligned).
    fn slot(&self, pos: u64) -> &AtomicU64 {
        let at = (pos as usize) & (self.map.ring - 1) & !(SLOT as usize - 1);
        self.map.word64(self.data + at)
    }

    /// The writing end (one per ring, on one side).
    pub fn producer(self) -> Producer {
        let head = self.head().load(Ordering::Acquire) / SLOT * SLOT;
        let frames = self.written().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Acquire);
        Producer { ring: self, head, frames, tail }
    }

    /// The reading end (one per ring, on the other side).
    pub fn consumer(self) -> Consumer {
        let tail = self.tail().load(Ordering::Acquire) / SLOT * SLOT;
        let frames = self.consumed().load(Ordering::Acquire);
        let seen_sock = self.sock().load(Ordering::Acquire);
        Consumer { ring: self, tail, frames, seen_sock }
    }

    /// Tells this ring's reader the socket has something for it (it checks the socket
    /// next). Needs no producer: it moves no position.
    pub fn doorbell(&self) {
        self.sock().fetch_add(1, Ordering::Release);
        self.ring_bell();
    }

    fn ring_bell(&self) {
        // Pairs with the reader's store of `sleeping` and its re-check (a Dekker fence):
        // either it sees our frame, or we see that it may sleep, change the futex word
        // (so a wait about to start returns at once) and wake it. A spinning reader never
        // sets `sleeping`, so a frame writes no shared line but its own slot.
        fence(Ordering::SeqCst);
        if self.sleeping().load(Ordering::SeqCst) != 0 {
            self.bell().fetch_add(1, Ordering::SeqCst);
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
    /// Our own count of bytes written (the mapping's copy is for a side that maps again).
    head: u64,
    /// Our own count of frames written.
    frames: u64,
    /// The reader's `tail` as last read (read again only when it leaves too little room,
    /// so a frame does not pull the reader's cache line over).
    tail: u64,
}

impl Producer {
    /// The largest frame (length prefix included) this ring takes; a larger one goes by
    /// the socket.
    pub fn max_frame(&self) -> usize {
        self.ring.map.ring / 2
    }

    /// Appends one whole frame (as the socket carries it: u32 length, then the body) and
    /// rings the bell. `Ok(false)`: no room now (the reader is behind) or a frame over
    /// [`Producer::max_frame`]; Err: the reader's position is impossible.
    pub fn push(&mut self, frame: &[u8]) -> Result<bool, ShmError> {
        let cap = self.ring.map.ring as u64;
        if frame.len() > self.max_frame() || frame.len() <= 4 {
            return Ok(false);
        }
        let body = &frame[4..];
        let need = slot_len(body.len());
        let used = self.head.wrapping_sub(self.tail);
        if used > cap || cap - used < need {
            let tail = self.ring.tail().load(Ordering::Acquire);
            let used = self.head.wrapping_sub(tail);
            if used > cap || tail % SLOT != 0 {
                return Err(ShmError::Violation(format!(
                    "the reader says it consumed {tail}, but {} bytes were written",
                    self.head
                )));
            }
            self.tail = tail;
            if cap - used < need {
                return Ok(false);
            }
        }
        self.ring.copy_in(self.head + 8, body);
        let word = body.len() as u64 | u64::from(frame_number(self.frames)) << 32;
        self.ring.slot(self.head).store(word, Ordering::Release);
        self.head += need;
        self.frames += 1;
        self.ring.head().store(self.head, Ordering::Relaxed);
        self.ring.written().store(self.frames, Ordering::Relaxed);
        self.ring.ring_bell();
        Ok(true)
    }

    /// Tells the reader the socket has something for it (see [`Ring::doorbell`]).
    pub fn doorbell(&self) {
        self.ring.doorbell();
    }

    /// Whether the reader asked to hear of new frames on the socket too ([`Ring::ask_nudge`]);
    /// read after [`Producer::push`], whose fence orders it after the frame.
    pub fn reader_wants_nudge(&self) -> bool {
        self.ring.nudge().load(Ordering::SeqCst) != 0
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
    /// Our own count of frames consumed.
    frames: u64,
    seen_sock: u32,
}

impl Consumer {
    /// The next whole frame's body (copied out of the mapping), None if there is none yet.
    /// Err when the writer broke the ring's rules: the frame claims more than `max_frame`
    /// or more than the ring can hold, or carries the wrong number.
    pub fn pop(&mut self, max_frame: usize) -> Result<Option<Vec<u8>>, ShmError> {
        let mut body = Vec::new();
        Ok(self.pop_into(max_frame, &mut body)?.then_some(body))
    }

    /// [`Consumer::pop`] into `body` (cleared first; its capacity is reused): true if a
    /// whole frame's body is now in it.
    pub fn pop_into(&mut self, max_frame: usize, body: &mut Vec<u8>) -> Result<bool, ShmError> {
        body.clear();
        let word = self.ring.slot(self.tail).load(Ordering::Acquire);
        if word == 0 {
            return Ok(false);
        }
        let (len, number) = (word as u32 as usize, (word >> 32) as u32);
        let due = frame_number(self.frames);
        if number != due {
            return Err(ShmError::Violation(format!(
                "frame number {number} where {due} was due (a slot written out of turn)"
            )));
        }
        let most = max_frame.min(self.ring.map.ring / 2 - 4);
        if len == 0 || len > most {
            return Err(ShmError::Violation(format!("a frame of {len} bytes (1 to {most} here)")));
        }
        body.resize(len, 0);
        self.ring.copy_out(self.tail + 8, body);
        // Every line of the slot gets a zero first word before the writer may reuse it.
        let used = slot_len(len);
        for line in (0..used).step_by(SLOT as usize) {
            self.ring.slot(self.tail + line).store(0, Ordering::Relaxed);
        }
        self.tail += used;
        self.frames += 1;
        self.ring.consumed().store(self.frames, Ordering::Relaxed);
        self.ring.tail().store(self.tail, Ordering::Release);
        Ok(true)
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
        // The clock is read only once a frame is not there after the first looks: a read
        // costs tens of ns on some machines (25–50 here), a good part of a spin round trip.
        // The slice and the spin budget count from that first read.
        let limits = |start: Instant| {
            let until = deadline.map_or(start + slice, |d| d.min(start + slice));
            let spin_until = match strategy {
                WaitStrategy::Spin => until,
                WaitStrategy::SpinThenFutex => until.min(start + SPIN_FOR),
                WaitStrategy::Futex => start,
            };
            (until, spin_until)
        };
        // The writer may share this CPU (both pinned to one): a spinner lets it run now and
        // then. `spin` is for dedicated CPUs, so it yields rarely (a yield is a syscall a
        // frame may arrive during); `spin-then-futex` is the default anywhere, so it yields
        // every [`LOOKS_PER_YIELD`] looks.
        let yield_every = if strategy == WaitStrategy::Spin { 1024 } else { LOOKS_PER_YIELD };
        let mut n = 0u32;
        let mut start = None;
        loop {
            if let Some(w) = self.ready()? {
                return Ok(w);
            }
            n = n.wrapping_add(1);
            if n % yield_every == 0 {
                let now = Instant::now();
                let (_, spin_until) = limits(*start.get_or_insert(now));
                if now >= spin_until {
                    break;
                }
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        let (until, _) = limits(start.unwrap_or_else(Instant::now));
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
        if self.ring.slot(self.tail).load(Ordering::Acquire) != 0 {
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
                (0..=(round % 700) as usize).map(|i| (i as u8) ^ round as u8).collect();
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
        assert!(!tx.push(&frame(&[0u8; 2045])).unwrap(), "over half the ring goes by the socket");
        // 1000-byte bodies take 1024 bytes each (slot header and padding in)
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
        let slot = |word: u64| map.replies().slot(0).store(word, Ordering::Release);
        // a frame claiming more than the ring
        slot(u64::from(u32::MAX) | 1 << 32);
        assert!(matches!(rx.pop(1 << 20), Err(ShmError::Violation(_))));
        // a frame claiming more than max_frame
        slot(100 | 1 << 32);
        assert!(matches!(rx.pop(10), Err(ShmError::Violation(_))));
        // a frame of no bytes
        slot(1 << 32);
        assert!(matches!(rx.pop(1 << 20), Err(ShmError::Violation(_))));
        // a frame out of turn (number 7 where 1 is due)
        slot(10 | 7 << 32);
        assert!(matches!(rx.pop(1 << 20), Err(ShmError::Violation(_))));
        // and a reader that lies about its tail to the writer: seen once the writer needs
        // the room it claims to have made (the writer reads `tail` only then)
        let mut tx = map.calls().producer();
        map.calls().tail().store(u64::MAX / 2, Ordering::Release);
        let f = frame(&[1u8; 1000]);
        let outcome = (0..5).map(|_| tx.push(&f)).find(|r| !matches!(r, Ok(true)));
        assert!(matches!(outcome, Some(Err(ShmError::Violation(_)))), "{outcome:?}");
    }

    #[test]
    fn a_consumed_slot_never_reads_as_a_frame_again() {
        // Bodies whose bytes look like slot headers (the due number, a small length):
        // once consumed, the reader must not take them for the next frames.
        let (map, _fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let mut tx = map.calls().producer();
        let mut rx = map.calls().consumer();
        let mut body = Vec::new();
        for n in 1..=64u64 {
            body.extend_from_slice(&(8 | n << 32).to_le_bytes());
        }
        for round in 0..40 {
            assert!(tx.push(&frame(&body[..400 + round])).unwrap());
            assert_eq!(rx.pop(1 << 20).unwrap().map(|b| b.len()), Some(400 + round));
            assert_eq!(rx.pop(1 << 20).unwrap(), None, "round {round}: a stale slot was read");
        }
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
            // the header words and a slot header that passes the number check, now and then
            if next() % 4 == 0 {
                map.replies().tail().store(next() % 10_000 * SLOT, Ordering::Release);
                map.replies().consumed().store(next() % 3, Ordering::Release);
                let rx = map.replies().consumer();
                let word = (next() % 3000) | (u64::from(frame_number(rx.frames)) << 32);
                map.replies().slot(rx.tail).store(word, Ordering::Release);
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
    fn a_ping_in_a_fresh_ring_is_the_slot_protocol_md_shows() {
        let (map, _fd) = Mapping::create(4096).unwrap();
        let map = Arc::new(map);
        let mut tx = map.calls().producer();
        let mut frame = Vec::new();
        crate::frame::encode_frame(&crate::Message::Ping { seq: 7 }, &mut frame).unwrap();
        assert!(tx.push(&frame).unwrap());
        let mut slot = [0u8; 64];
        // SAFETY: the calls ring's first 64 data bytes lie inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(map.base.add(DATA_START), slot.as_mut_ptr(), 64) };
        let hex: String = slot[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "02000000010000000907000000000000");
        assert!(slot[10..].iter().all(|&b| b == 0), "padded with zeroes");
        assert_eq!(map.calls().head().load(Ordering::Acquire), 64);
        assert_eq!(map.calls().written().load(Ordering::Acquire), 1);
        let doc = include_str!("../PROTOCOL.md");
        assert!(doc.contains(&hex), "PROTOCOL.md quotes the slot");
        // Once read, the slot's first word is zero again and the reader's words moved.
        let mut rx = map.calls().consumer();
        assert_eq!(rx.pop(1 << 20).unwrap().as_deref(), Some(&frame[4..]));
        assert_eq!(map.calls().slot(0).load(Ordering::Acquire), 0);
        assert_eq!(map.calls().tail().load(Ordering::Acquire), 64);
        assert_eq!(map.calls().consumed().load(Ordering::Acquire), 1);
    }

    #[test]
    fn the_mapping_cannot_be_shrunk_or_grown_by_either_side() {
        let (_map, fd) = Mapping::create(4096).unwrap();
        assert!(Mapping::size_sealed(&fd));
        // SAFETY: a NUL-terminated name; the result is checked.
        let plain = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(plain >= 0);
        // SAFETY: memfd_create just returned it to us.
        assert!(!Mapping::size_sealed(&unsafe { OwnedFd::from_raw_fd(plain) }));
        for len in [0, 4096, 1 << 20] {
            // SAFETY: a valid descriptor; the call is expected to fail.
            let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
            assert_eq!(r, -1, "ftruncate to {len} went through");
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
    }

    #[test]
    fn a_mapping_that_is_not_ours_is_refused() {
        let (map, fd) = Mapping::create(4096).unwrap();
        map.scribble(0, b"NOPE");
        assert!(matches!(Mapping::open(&fd), Err(ShmError::Layout(_))));
        assert!(Mapping::create(5000).is_err());
    }
}
