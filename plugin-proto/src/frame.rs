//! Framing: a `u32` little-endian body length, then the bincode body.
//!
//! Readers check the length against the negotiated maximum *before*
//! allocating, so a peer that sends a length of 4 GiB costs nothing but an
//! error. Both a blocking reader (for the plugin SDK) and an incremental
//! decoder over a byte buffer (for async callers) are provided; neither does
//! any I/O policy beyond reading and writing whole frames.

use std::io::{self, Read, Write};

use crate::codec::{self, CodecError};
use crate::message::{CallRef, Message, Reply};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// Default largest frame body: 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Largest frame body any peer may negotiate (16 MiB); a peer may only lower it.
/// It is also the codec's hard allocation bound: no frame, whatever lengths
/// it claims inside, makes the decoder allocate more than this.
pub const MAX_FRAME_CEILING: u32 = DEFAULT_MAX_FRAME;

/// On a `SOCK_SEQPACKET` socket (`transport = "seqpacket"`) the frames are the same, carried
/// in records: no record is longer than this, and every read offers at least this much room
/// (a record read into less loses its tail). The byte stream is the records in order.
pub const RECORD_MAX: usize = 64 * 1024;

/// A framing failure.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the socket between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the socket in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the header promised (header included).
        want: usize,
    },
    /// The header announced a body larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The header announced an empty body, which no message encodes to.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(#[from] CodecError),
}

impl FrameError {
    /// True when the peer broke the protocol (as opposed to the connection ending or failing).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, FrameError::TooLarge { .. } | FrameError::Empty | FrameError::Malformed(_))
    }
}

/// Appends one whole frame (header and body) carrying `msg` to `out`.
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    match msg {
        // The two messages of every call, written by hand (the same bytes; see codec::hot).
        Message::Call(c) => encode_call_frame(
            &CallRef {
                id: c.id,
                method: &c.method,
                deadline_us: c.deadline_us,
                payload: c.payload.as_ref(),
            },
            out,
        ),
        Message::Reply(Reply { id, result: Ok(p) }) => frame_of(out, |out| {
            codec::hot::write_reply_ok(*id, &p.as_ref(), out);
            Ok(())
        }),
        _ => frame_of(out, |out| codec::encode_into(msg, out)),
    }
}

/// Appends the frame of `Message::Call` for a borrowed call: the same bytes as
/// [`encode_frame`] writes for the owned `Call`, without building one.
pub fn encode_call_frame(call: &CallRef<'_>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    frame_of(out, |out| {
        codec::hot::write_call(call, out);
        Ok(())
    })
}

/// Appends a frame whose body `body` writes.
fn frame_of(
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Checks a header against `max` and returns the body length it announces.
pub fn body_len(header: [u8; HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    if len > max.min(MAX_FRAME_CEILING) {
        return Err(FrameError::TooLarge { len, max: max.min(MAX_FRAME_CEILING) });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len as usize)
}

/// Decodes a frame body.
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    // A Call or a Reply with a result is read by hand (see codec::hot); anything else, or
    // anything unusual in those, the general way.
    if let Some((&tag, rest)) = body.split_first() {
        if tag == codec::hot::CALL {
            if let Some(c) = codec::hot::read_call(rest) {
                return Ok(Message::Call(c.to_call()));
            }
        } else if tag == codec::hot::REPLY {
            if let Some((id, p)) = codec::hot::read_reply_ok(rest) {
                return Ok(Message::Reply(Reply { id, result: Ok(p.to_payload()) }));
            }
        }
    }
    Ok(codec::decode(body)?)
}

/// Writes one frame to a blocking writer (one `write_all` of the whole frame).
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    msg: &Message,
    max: u32,
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(64);
    encode_frame(msg, &mut buf)?;
    let body = buf.len() - HEADER_LEN;
    if body > max as usize {
        return Err(FrameError::TooLarge { len: body as u32, max });
    }
    w.write_all(&buf)?;
    Ok(())
}

/// The body grows as its bytes arrive, at most this much at a time: a peer that
/// announces 16 MiB and sends nothing more costs 64 KiB, not 16 MiB.
const READ_STEP: usize = 64 * 1024;

/// Reads one frame from a blocking reader.
pub fn read_frame<R: Read + ?Sized>(r: &mut R, max: u32) -> Result<Message, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    read_full(r, &mut header, 0, HEADER_LEN + 1)?;
    let len = body_len(header, max)?;
    let mut body = Vec::with_capacity(len.min(READ_STEP));
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(READ_STEP), 0);
        match r.read(&mut body[start..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got: HEADER_LEN + start,
                    want: HEADER_LEN + len,
                })
            }
            Ok(n) => body.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => body.truncate(start),
            Err(e) => return Err(e.into()),
        }
    }
    decode_body(&body)
}

/// Fills `buf`; `offset` and `want` only shape the error for an early end.
fn read_full<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    offset: usize,
    want: usize,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && offset == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated { got: offset + got, want }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Splits frames off the front of a growing byte buffer (for non-blocking readers).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max: u32,
}

impl FrameDecoder {
    /// A decoder that rejects bodies larger than `max` bytes.
    pub fn new(max: u32) -> Self {
        Self { max }
    }

    /// Changes the limit (after the handshake negotiated one).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// How many bytes the next frame needs in total, once its header is in `buf`.
    pub fn needed(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = [buf[0], buf[1], buf[2], buf[3]];
        Ok(Some(HEADER_LEN + body_len(header, self.max)?))
    }

    /// Removes and decodes the first whole frame in `buf`, or returns `None` if it is incomplete.
    pub fn next(&self, buf: &mut Vec<u8>) -> Result<Option<Message>, FrameError> {
        let total = match self.needed(buf)? {
            Some(total) if buf.len() >= total => total,
            _ => return Ok(None),
        };
        let msg = decode_body(&buf[HEADER_LEN..total]);
        buf.drain(..total);
        msg.map(Some)
    }
}
