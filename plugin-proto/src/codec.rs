//! The one room that knows bincode.
//!
//! Every byte that crosses the plugin socket is encoded here, so the
//! serialization library can be swapped by editing this file alone. The wire
//! format is bincode 2.0.1 `config::standard()` (little-endian, variable-length
//! integers) driven through serde. JSON helpers for payloads live here too.

use serde::{de::DeserializeOwned, Serialize};

/// The bincode configuration used to encode: `standard()` (the decode side adds a limit).
fn wire_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Decodes with a limit on what the bytes may claim: bincode allocates a string or a
/// byte vector at the length the input announces before it reads it, so the limit is
/// what stops a short hostile input from costing megabytes. It is chosen from the
/// input's own size (the smallest step at least 8x its length, never above twice the
/// frame ceiling): a decode never allocates more than a small multiple of what was
/// received. Eight times, not once, because bincode also counts every integer at its
/// full width (a u64 sent as a one-byte varint claims 8), so a body right at the frame
/// limit claims more than it holds and must still decode.
fn decode_limited<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    fn with<T: DeserializeOwned, const L: usize>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
        let config = bincode::config::standard().with_limit::<L>();
        bincode::serde::decode_from_slice::<T, _>(bytes, config)
            .map_err(|e| CodecError::Decode(e.to_string()))
    }
    const CEILING: usize = crate::frame::MAX_FRAME_CEILING as usize;
    match bytes.len().saturating_mul(8) {
        n if n <= 4 << 10 => with::<T, { 4 << 10 }>(bytes),
        n if n <= 64 << 10 => with::<T, { 64 << 10 }>(bytes),
        n if n <= 1 << 20 => with::<T, { 1 << 20 }>(bytes),
        n if n <= 16 << 20 => with::<T, { 16 << 20 }>(bytes),
        _ => with::<T, { 2 * CEILING }>(bytes),
    }
}

/// An encoding or decoding failure, with the codec's own explanation.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (for example a map with non-string keys in JSON).
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// The bytes are not a valid encoding of the expected type.
    #[error("cannot decode value: {0}")]
    Decode(String),
    /// The bytes decoded but some were left over, which a well-formed peer never sends.
    #[error("cannot decode value: {0} trailing bytes after the value")]
    Trailing(usize),
}

/// Appends the bincode encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, wire_config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Returns the bincode encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Room for a typical small message up front: growing from empty would take three
    // allocations (8, 16, 32 bytes) to encode a 25-byte tick.
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes exactly one value from `bytes`; leftover bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = decode_limited::<T>(bytes)?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes exactly one value from `bytes`, borrowing its strings and byte strings from
/// them (no allocation for those); leftover bytes are an error. For the hot path only: a
/// borrowed value allocates nothing, so the size limit [`decode`] sets is not needed.
pub fn decode_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::borrow_decode_from_slice::<T, _>(bytes, wire_config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Returns the JSON encoding of `value` (the payload codec for tooling and other languages).
pub fn json_encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a JSON payload.
pub fn json_decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
}

/// Hand-written readers and writers for the two messages on every call's path (a
/// `Call`, a `Reply` with a result), byte for byte what the serde path reads and writes:
/// `plugin-proto/tests/roundtrip.rs` compares the two on every message shape and on
/// random bytes. Through serde, bincode spends about 100 ns on a small Call or Reply here
/// (visitors, an enum's variant seed, a varint per field); these take a few ns, a good
/// part of a round trip over shared memory. A reader that meets anything unusual (a
/// varint it does not know, a short body, a Reply with an error) answers `None`, and its
/// caller decodes the body the general way, which also says what is wrong with it.
pub(crate) mod hot {
    use crate::message::{CallRef, PayloadCodec, PayloadRef};

    /// bincode's varint markers: a u16, u32 or u64 follows, little-endian.
    const U16: u8 = 251;
    const U32: u8 = 252;
    const U64: u8 = 253;

    /// A message's variant tag (its index, one varint byte below 251).
    pub const CALL: u8 = 4;
    pub const REPLY: u8 = 5;

    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
        let end = at.checked_add(n)?;
        let v = b.get(*at..end)?;
        *at = end;
        Some(v)
    }

    /// A u64 varint as bincode `standard()` reads it (a wider form of a small value too).
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let first = *b.get(*at)?;
        *at += 1;
        Some(match first {
            0..=250 => u64::from(first),
            U16 => u64::from(u16::from_le_bytes(take(b, at, 2)?.try_into().ok()?)),
            U32 => u64::from(u32::from_le_bytes(take(b, at, 4)?.try_into().ok()?)),
            U64 => u64::from_le_bytes(take(b, at, 8)?.try_into().ok()?),
            _ => return None,
        })
    }

    /// A length-prefixed byte string.
    fn bytes<'a>(b: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
        let len = usize::try_from(varint(b, at)?).ok()?;
        take(b, at, len)
    }

    /// A payload: its codec (an enum index, one byte) and its bytes.
    fn payload<'a>(b: &'a [u8], at: &mut usize) -> Option<PayloadRef<'a>> {
        let codec = match *b.get(*at)? {
            0 => PayloadCodec::Bincode,
            1 => PayloadCodec::Json,
            _ => return None,
        };
        *at += 1;
        Some(PayloadRef { codec, data: bytes(b, at)? })
    }

    /// The fields of a `Call` (the body after its tag), if all of `b` is one.
    pub fn read_call(b: &[u8]) -> Option<CallRef<'_>> {
        let at = &mut 0;
        let id = varint(b, at)?;
        let method = std::str::from_utf8(bytes(b, at)?).ok()?;
        let deadline_us = varint(b, at)?;
        let payload = payload(b, at)?;
        (*at == b.len()).then_some(CallRef { id, method, deadline_us, payload })
    }

    /// The id and payload of a `Reply` with a result (the body after its tag), if all of
    /// `b` is one.
    pub fn read_reply_ok(b: &[u8]) -> Option<(u64, PayloadRef<'_>)> {
        let at = &mut 0;
        let id = varint(b, at)?;
        // Result's variant: 0 is Ok.
        if *b.get(*at)? != 0 {
            return None;
        }
        *at += 1;
        let payload = payload(b, at)?;
        (*at == b.len()).then_some((id, payload))
    }

    fn put_varint(v: u64, out: &mut Vec<u8>) {
        if v <= 250 {
            out.push(v as u8);
        } else if let Ok(v) = u16::try_from(v) {
            out.push(U16);
            out.extend_from_slice(&v.to_le_bytes());
        } else if let Ok(v) = u32::try_from(v) {
            out.push(U32);
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            out.push(U64);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn put_bytes(v: &[u8], out: &mut Vec<u8>) {
        put_varint(v.len() as u64, out);
        out.extend_from_slice(v);
    }

    fn put_payload(p: &PayloadRef<'_>, out: &mut Vec<u8>) {
        out.push(match p.codec {
            PayloadCodec::Bincode => 0,
            PayloadCodec::Json => 1,
        });
        put_bytes(p.data, out);
    }

    /// Appends the body of `Message::Call` for `c`.
    pub fn write_call(c: &CallRef<'_>, out: &mut Vec<u8>) {
        out.reserve(24 + c.method.len() + c.payload.data.len());
        out.push(CALL);
        put_varint(c.id, out);
        put_bytes(c.method.as_bytes(), out);
        put_varint(c.deadline_us, out);
        put_payload(&c.payload, out);
    }

    /// Appends the body of `Message::Reply` with the result `Ok(payload)`.
    pub fn write_reply_ok(id: u64, payload: &PayloadRef<'_>, out: &mut Vec<u8>) {
        out.reserve(24 + payload.data.len());
        out.push(REPLY);
        put_varint(id, out);
        out.push(0);
        put_payload(payload, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_varint_little_endian() {
        assert_eq!(encode(&7u64).unwrap(), vec![7]);
        assert_eq!(encode(&251u64).unwrap(), vec![251, 251, 0]);
        assert_eq!(encode(&0x1234_5678u32).unwrap(), vec![252, 0x78, 0x56, 0x34, 0x12]);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        assert!(matches!(decode::<u8>(&[1, 2]), Err(CodecError::Trailing(1))));
    }

    #[test]
    fn huge_claimed_length_fails_without_allocating_it() {
        // A string claiming 2^60 bytes: varint tag 253 (u64) + 8 bytes.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<serde_bytes::ByteBuf>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }
}
