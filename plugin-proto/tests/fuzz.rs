//! A decoder fuzz harness on stable Rust: a seeded loop over random bytes and mutations of
//! the golden frames, through every public decoding entry point, each input under
//! `catch_unwind`, with an allocator that records the largest single allocation and the
//! peak of live bytes. Zero panics is the bar, and no single allocation above 16× the
//! input's size (or 1 MiB, serde's cap on preallocating a sequence): a hostile length
//! inside a frame costs next to nothing.
//!
//! `cargo test` runs 10^5 inputs. The long run (10^7 inputs, about 20 s here in release):
//!
//! ```sh
//! PLUGD_FUZZ_ITERS=10000000 cargo test --release -p plugin-proto --test fuzz -- --nocapture
//! ```
//!
//! `PLUGD_FUZZ_SEED` picks another sequence; a failure prints the seed and the input
//! (hex), so it can be replayed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use plugin_proto::frame::{decode_body, read_frame, FrameDecoder, HEADER_LEN, MAX_FRAME_CEILING};
use plugin_proto::*;

/// Counts what the decoders allocate.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most any decoder may allocate at once for an input of `len` bytes: a small
/// multiple of what was received (the codec's limit is 8× the input, in steps of 16×),
/// or serde's 1 MiB preallocation cap for a sequence — never the megabytes a hostile
/// length inside it may claim.
fn ceiling(len: usize) -> usize {
    // serde preallocates a sequence at the length it is told, up to 1 MiB ("cautious").
    (16 * len).max((1 << 20) + (64 << 10)).min(2 * MAX_FRAME_CEILING as usize + (1 << 20))
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn golden() -> Vec<Vec<u8>> {
    let text = include_str!("../golden/vectors.txt");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|hex| {
            (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

/// Lengths that sit on the edges of what a decoder checks.
const EDGES: &[u32] = &[
    0,
    1,
    0x7f,
    0x80,
    0xfb,
    0xfc,
    0xfd,
    0xfe,
    0xff,
    0xffff,
    0x1_0000,
    MAX_FRAME_CEILING,
    MAX_FRAME_CEILING + 1,
    u32::MAX,
];

fn input(rng: &mut Rng, golden: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(4) == 0 {
        // Random bytes, sometimes behind a plausible header.
        let n = rng.below(512);
        let mut v: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 && v.len() >= HEADER_LEN {
            let len = (v.len() - HEADER_LEN) as u32;
            v[..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
        }
        return v;
    }
    let mut v = golden[rng.below(golden.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = [0, 0xff, 0xfb, 0xfc, 0xfd, 0xfe, 0x80, 0x7f][rng.below(8)];
            }
            2 => v.insert(at, rng.next() as u8),
            3 if !v.is_empty() => {
                v.remove(at.min(v.len() - 1));
            }
            4 => v.truncate(at),
            5 if v.len() >= HEADER_LEN => {
                let e = EDGES[rng.below(EDGES.len())];
                v[..HEADER_LEN].copy_from_slice(&e.to_le_bytes());
            }
            6 => {
                // A varint that claims a huge length, somewhere in the body.
                let huge = [0xfc, 0xff, 0xff, 0xff, 0x7f];
                let at = at.max(HEADER_LEN.min(v.len()));
                for (k, b) in huge.iter().enumerate() {
                    v.insert((at + k).min(v.len()), *b);
                }
            }
            _ => {
                // Two frames back to back (the second maybe cut).
                let other = &golden[rng.below(golden.len())];
                let cut = rng.below(other.len() + 1);
                v.extend_from_slice(&other[..cut]);
            }
        }
    }
    v
}

/// Every public way bytes from a peer are decoded.
fn decode_everywhere(bytes: &[u8]) {
    if bytes.len() >= HEADER_LEN {
        let _ = decode_body(&bytes[HEADER_LEN..]);
    }
    let _ = decode_body(bytes);
    let _ = CallRef::read(bytes);
    let _ = codec::decode::<Message>(bytes);
    let _ = codec::json_decode::<Message>(bytes);
    let _ = codec::json_decode::<serde_json::Value>(bytes);
    let _ = read_frame(&mut &bytes[..], DEFAULT_MAX_FRAME);
    let _ = read_frame(&mut &bytes[..], 64);
    let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = bytes.to_vec();
    for _ in 0..8 {
        match decoder.next(&mut buf) {
            Ok(Some(Message::Call(call))) => {
                let _ = call.payload.decode::<serde_json::Value>();
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let _ = decoder.needed(bytes);
}

#[test]
fn no_input_panics_a_decoder_or_allocates_past_the_ceiling() {
    let iters: u64 =
        std::env::var("PLUGD_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 =
        std::env::var("PLUGD_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_f00d);
    let golden = golden();
    assert!(golden.len() >= 10, "the golden vectors are the seeds");
    let mut rng = Rng(seed | 1);
    // Panics are caught and counted; keep the default hook from printing each one.
    std::panic::set_hook(Box::new(|_| {}));
    let start = std::time::Instant::now();
    let mut panics = Vec::new();
    let mut too_big = Vec::new();
    for i in 0..iters {
        let bytes = input(&mut rng, &golden);
        let before = LARGEST.swap(0, Ordering::Relaxed);
        if std::panic::catch_unwind(|| decode_everywhere(&bytes)).is_err() && panics.len() < 5 {
            panics.push((i, hex(&bytes)));
        }
        let largest = LARGEST.swap(before, Ordering::Relaxed);
        LARGEST.fetch_max(largest, Ordering::Relaxed);
        if largest > ceiling(bytes.len()) && too_big.len() < 5 {
            too_big.push((i, largest, hex(&bytes)));
        }
    }
    let _ = std::panic::take_hook();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {iters} inputs in {secs:.1} s ({:.0} inputs/s), seed {seed}, {} panics, largest single allocation {} KiB, peak live {} KiB",
        iters as f64 / secs,
        panics.len(),
        LARGEST.load(Ordering::Relaxed) >> 10,
        PEAK_LIVE.load(Ordering::Relaxed) >> 10
    );
    assert!(panics.is_empty(), "decoders panicked (seed {seed}; input number, hex): {panics:?}");
    assert!(
        too_big.is_empty(),
        "allocations past 16x the input (seed {seed}; input number, bytes, hex): {too_big:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(256).map(|b| format!("{b:02x}")).collect()
}
